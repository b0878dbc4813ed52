"""Supervisor tuning: DreamBooth-LoRA of a diffusion model on the subject photos."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from proxytune.backends._base import ModelSource, SupervisorBackend, default_device
from proxytune.config import SupervisorParams
from proxytune.contracts import AdapterCard, SubjectRef, read_adapter_card
from proxytune.images import to_tensor
from proxytune.ingest import load_subject, subject_key
from proxytune.prompts import INSTANCE_TEMPLATE, fill
from proxytune.registry import SUPERVISORS
from proxytune.storage import ObjectStore
from proxytune.tracking import Tracker
from proxytune.training import AdapterSpec, fixed_loss, tune_adapter

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
    With a `store`, training checkpoints there and a re-run resumes."""
    tracker = tracker or Tracker()
    subject, photos = load_subject(subject_dir)
    backend: SupervisorBackend = SUPERVISORS.create(params.backend)
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

    def batch_loss(generator: torch.Generator) -> Iterator[tuple[torch.Tensor, float]]:
        index = torch.randint(0, latents.shape[0], (params.batch_size,), generator=generator)
        yield backend.training_loss(latents[index], cond.expand(params.batch_size, -1, -1), generator), 1.0

    def all_photos_loss(generator: torch.Generator) -> Iterator[tuple[torch.Tensor, float]]:
        yield backend.training_loss(latents, cond.expand(latents.shape[0], -1, -1), generator), 1.0

    trainable = backend.add_lora(params.rank, alpha)
    spec = AdapterSpec(
        kind="supervisor",
        backend=backend.name,
        source=source,
        subjects=[
            SubjectRef(name=subject.name, identifier=subject.identifier, class_noun=subject.class_noun)
        ],
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


def load_supervisor(
    adapter_dir: str | Path, device: torch.device | None = None
) -> tuple[SupervisorBackend, AdapterCard]:
    """Base pipeline + the adapter in `adapter_dir`, checked against its card."""
    card = read_adapter_card(adapter_dir, "supervisor")
    backend: SupervisorBackend = SUPERVISORS.create(card.backend)
    backend.load(device or default_device(), ModelSource(card.base_model.id, card.base_model.revision))
    backend.resolution = card.params["resolution"]
    backend.load_lora(str(adapter_dir))
    return backend, card
