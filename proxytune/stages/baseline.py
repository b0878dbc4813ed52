"""The direct-tuning baseline: the AR student LoRA-tuned on the subject's few real photos
instead of proxy images, the comparison the paper makes (AR models tuned directly do poorly).

Everything but the data is the student's: the same backend, LoRA, steps and settings
(`student.*`), and the evaluation samples it with the same prompts and seeds. The photos are
imported as a proxy Dataset captioned with DreamBooth's instance prompt ("a sks dog"), as the
supervisor is trained, so the student's training loop and token cache serve unchanged. All
photos are trained on (none held out: there are only 3-6); several subjects train one joint
adapter, as they do for the student.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from proxytune.core.contracts import SUBJECT_FILE, AdapterCard, Subject, SubjectRef
from proxytune.core.params import ProxyParams, StudentParams
from proxytune.core.prompts import INSTANCE_TEMPLATE
from proxytune.core.storage import ObjectStore
from proxytune.core.tracking import Tracker
from proxytune.stages.proxy_import import import_proxy
from proxytune.stages.student import tune_student

PHOTOS = "photos"  # the card's `training_data` for the direct baseline
NOT_TRAINED = "NOT_TRAINED.txt"  # in the pipeline's direct artifact when no baseline was asked for


def tune_direct(
    subject_dirs: Sequence[str | Path],
    out_dir: str | Path,
    params: StudentParams,
    store: ObjectStore | None = None,
    tracker: Tracker | None = None,
    device: torch.device | None = None,
) -> AdapterCard:
    """LoRA-tune the student's base model on the subjects' photos (subject Datasets from
    ingest); the adapter goes to `out_dir`, its card saying `training_data: photos`."""
    photo_captions = ProxyParams(prompt_template=INSTANCE_TEMPLATE)
    with tempfile.TemporaryDirectory(prefix="proxytune-direct-") as tmp:
        datasets = []
        for i, subject_dir in enumerate(subject_dirs):
            subject = Subject.read(Path(subject_dir) / SUBJECT_FILE)
            ref = SubjectRef(name=subject.name, identifier=subject.identifier, class_noun=subject.class_noun)
            datasets.append(Path(tmp) / f"{i:03d}")
            import_proxy(str(Path(subject_dir) / "images"), datasets[-1], ref, photo_captions)
        return tune_student(
            datasets,
            out_dir,
            params.model_copy(update={"holdout_fraction": 0.0}),
            store,
            tracker,
            device,
            training_data=PHOTOS,
        )
