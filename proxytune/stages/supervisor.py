"""Supervisor tuning: DreamBooth-LoRA of a diffusion model on the subject photos."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from proxytune import __version__
from proxytune.backends._base import ModelSource, default_device
from proxytune.backends._diffusion import DiffusionSupervisor, repeat
from proxytune.core.contracts import CARD_FILE, IMPORTED, AdapterCard, ModelRef, Subject
from proxytune.core.images import to_tensor
from proxytune.core.params import SupervisorParams
from proxytune.core.prompts import INSTANCE_TEMPLATE, fill
from proxytune.core.registry import SUPERVISORS
from proxytune.core.storage import ObjectStore
from proxytune.core.tracking import Tracker
from proxytune.stages.ingest import load_subject, subject_key
from proxytune.stages.training import AdapterSpec, fixed_loss, tune_adapter

log = logging.getLogger(__name__)
EVAL_SEEDS = range(10_000, 10_008)


def tune_supervisor(
    subject_dir: str | Path,
    out_dir: str | Path,
    params: SupervisorParams,
    tracker: Tracker | None = None,
    device: torch.device | None = None,
    store: ObjectStore | None = None,
) -> AdapterCard:
    """DreamBooth-LoRA on `a {identifier} {class_noun}`; writes the adapter to `out_dir`.
    Unset training values follow the backend's recipe; with a `store`, training checkpoints
    there and a re-run resumes. A subject whose proxy images are imported gets the card of a
    black-box supervisor instead: nothing is loaded or trained."""
    tracker = tracker or Tracker()
    subject, photos = load_subject(subject_dir)
    if subject.proxy_uri:
        return black_box_supervisor(subject, out_dir, tracker)
    backend: DiffusionSupervisor = SUPERVISORS.create(params.backend)
    params = params.with_recipe(backend.recipe)
    source = ModelSource(params.model_source) if params.model_source else backend.source
    log.info("loading supervisor %s (%s)", backend.name, source.id)
    backend.load(device or default_device(), source)
    resolution = params.resolution or backend.resolution
    backend.resolution = resolution
    alpha = params.alpha or float(params.rank)
    recorded = {
        **params.model_dump(),
        "resolution": resolution,
        "alpha": alpha,
        "subject_key": subject_key(subject),
    }
    tracker.log_params({**recorded, "photos": len(photos)})

    latents = backend.encode_images(to_tensor(photos, resolution))
    cond = backend.encode_prompts([fill(INSTANCE_TEMPLATE, subject.identifier, subject.class_noun)])

    def losses(index: torch.Tensor, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, float]]:
        """The batch `index` in micro-batches (one pass unless `micro_batch_size` is set)."""
        for part in index.split(params.micro_batch_size or len(index)):
            loss = backend.training_loss(latents[part], repeat(cond, len(part)), generator)
            yield loss, len(part) / len(index)

    def batch_loss(generator: torch.Generator) -> Iterator[tuple[torch.Tensor, float]]:
        return losses(
            torch.randint(0, latents.shape[0], (params.batch_size,), generator=generator), generator
        )

    def all_photos_loss(generator: torch.Generator) -> Iterator[tuple[torch.Tensor, float]]:
        return losses(torch.arange(latents.shape[0]), generator)

    trainable = backend.add_lora(params.rank, alpha)
    spec = AdapterSpec(
        kind="supervisor",
        backend=backend.name,
        source=source,
        subjects=[subject.ref()],
        params=recorded,
    )
    return tune_adapter(
        spec,
        params,
        trainable,
        batch_loss,
        lambda: {"photos": fixed_loss(all_photos_loss, EVAL_SEEDS)},
        lambda folder: backend.save_lora(str(folder)),
        out_dir,
        tracker,
        store,
    )


def black_box_supervisor(subject: Subject, out_dir: str | Path, tracker: Tracker) -> AdapterCard:
    """The card of a supervisor known only by its images (at `subject.proxy_uri`)."""
    card = AdapterCard(
        kind="supervisor",
        backend=IMPORTED,
        base_model=ModelRef(id=subject.proxy_uri),
        subjects=[subject.ref()],
        params={"proxy_uri": subject.proxy_uri},
        steps_done=0,
        losses=[],
        loss_before={},
        loss_after={},
        adapter_files=[],
        adapter_sha256="",
        proxytune_version=__version__,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    card.write(Path(out_dir) / CARD_FILE)
    tracker.log_params({"backend": IMPORTED, "proxy_uri": subject.proxy_uri})
    log.info("supervisor of %s: a black box, images imported from %s", subject.name, subject.proxy_uri)
    return card
