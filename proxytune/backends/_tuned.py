"""A tuned model back from its artifact folder: the base model its card names, plus its LoRA.

Proxy drawing, the evaluation and serving all load tuned models through these, so they live
with the backends rather than with the stages that trained them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from proxytune.backends._ar import ARStudent
from proxytune.backends._base import ModelSource, default_device
from proxytune.backends._diffusion import DiffusionSupervisor
from proxytune.core.contracts import AdapterCard, read_adapter_card
from proxytune.core.registry import STUDENTS, SUPERVISORS


def load_student(
    adapter_dir: str | Path, device: torch.device | None = None, base: str | None = None
) -> tuple[ARStudent, AdapterCard]:
    """Base student + the LoRA in `adapter_dir`, left unmerged: merging into bf16 weights would
    round small adapter deltas away (sampling pays a few percent for the extra matmuls).
    `base`: where the base weights are staged (folder, `s3://`, hub id) instead of the card's."""
    from peft import PeftModel

    card = read_adapter_card(adapter_dir, "student")
    backend = load_base_student(card, device, base)
    try:
        tuned = PeftModel.from_pretrained(backend.model, str(adapter_dir), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as error:
        raise ValueError(f"{adapter_dir}: the adapter does not fit {card.backend}: {error}") from None
    backend.model = tuned.base_model.model.eval()
    return backend, card


def load_base_student(
    card: AdapterCard, device: torch.device | None = None, base: str | None = None
) -> ARStudent:
    """The untuned AR model an adapter was trained on (the evaluation's `base` method), from the
    card's recorded source and revision, or from `base` (staged weights) instead."""
    backend: ARStudent = STUDENTS.create(card.backend)
    recorded = card.base_model
    source = ModelSource(base or recorded.id, None if base else recorded.revision, recorded.vq)
    backend.load(device or default_device(), source)
    return backend


def load_supervisor(
    adapter_dir: str | Path, device: torch.device | None = None
) -> tuple[DiffusionSupervisor, AdapterCard]:
    """Base pipeline + the adapter in `adapter_dir`, checked against its card."""
    card = read_adapter_card(adapter_dir, "supervisor")
    if card.imported:
        raise ValueError(
            f"{adapter_dir}: the supervisor of {card.subjects[0].name} is a black box (its images were "
            f"imported from {card.base_model.id}); it cannot draw"
        )
    backend: DiffusionSupervisor = SUPERVISORS.create(card.backend)
    backend.load(device or default_device(), ModelSource(card.base_model.id, card.base_model.revision))
    backend.resolution = card.params["resolution"]
    backend.load_lora(str(adapter_dir))
    return backend, card
