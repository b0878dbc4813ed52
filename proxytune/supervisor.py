"""Supervisor tuning: DreamBooth-LoRA of a diffusion model on the subject photos."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from proxytune.backends._base import ModelSource, default_device
from proxytune.backends._diffusion import DiffusionSupervisor, repeat
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
    Unset training values follow the backend's recipe; with a `store`, training checkpoints
    there and a re-run resumes."""
    tracker = tracker or Tracker()
    subject, photos = load_subject(subject_dir)
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
) -> tuple[DiffusionSupervisor, AdapterCard]:
    """Base pipeline + the adapter in `adapter_dir`, checked against its card."""
    card = read_adapter_card(adapter_dir, "supervisor")
    backend: DiffusionSupervisor = SUPERVISORS.create(card.backend)
    backend.load(device or default_device(), ModelSource(card.base_model.id, card.base_model.revision))
    backend.resolution = card.params["resolution"]
    backend.load_lora(str(adapter_dir))
    return backend, card
