"""LoRA training shared by supervisor and student: the loop, and the adapter it writes."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from proxytune import __version__
from proxytune.backends._base import ModelSource
from proxytune.config import StudentParams, SupervisorParams
from proxytune.contracts import CARD_FILE, AdapterCard, ModelRef, SubjectRef
from proxytune.fsutil import atomic_directory, sha256_file
from proxytune.tracking import Tracker

log = logging.getLogger(__name__)


MicroBatches = Callable[[torch.Generator], Iterator[tuple[torch.Tensor, float]]]
"""Draws one batch with all its randomness from the generator and yields it as micro-batches:
(mean loss of the micro-batch, its share of the batch). Only one micro-batch's activations
are alive at a time, so the batch size never decides the peak memory."""


def train_lora(
    parameters: Sequence[torch.nn.Parameter],
    batch_loss: MicroBatches,
    *,
    steps: int,
    learning_rate: float,
    max_grad_norm: float,
    seed: int,
    tracker: Tracker,
    desc: str,
) -> list[float]:
    """AdamW on `parameters` for `steps` steps, accumulating gradients over micro-batches.
    The generator is seeded, so a run is reproducible. Logs `train_loss` per step; returns
    the losses."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    every = max(1, steps // 10)
    with tqdm(range(steps), desc=desc, unit="step", mininterval=2.0) as progress:
        for step in progress:
            total = 0.0
            for loss, share in batch_loss(generator):
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
                (loss * share).backward()
                total += loss.item() * share
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            tracker.log_metric("train_loss", total, step)
            progress.set_postfix(loss=f"{total:.4f}", refresh=False)
            if step % every == 0 or step == steps - 1:
                log.info("%s step %d/%d loss %.4f", desc, step + 1, steps, total)
    return losses


@torch.no_grad()
def fixed_loss(batch_loss: MicroBatches, seeds: Sequence[int]) -> float:
    """Mean loss over fixed draws: comparable before and after training."""
    totals = [
        sum(loss.item() * share for loss, share in batch_loss(torch.Generator().manual_seed(s)))
        for s in seeds
    ]
    return sum(totals) / len(totals)


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is for; recorded in its card (`proxytune.json`)."""

    kind: str
    backend: str
    source: ModelSource
    subjects: list[SubjectRef]
    params: dict[str, Any]


def tune_adapter(
    spec: AdapterSpec,
    settings: SupervisorParams | StudentParams,
    parameters: Sequence[torch.nn.Parameter],
    batch_loss: MicroBatches,
    eval_losses: Callable[[], dict[str, float]],
    save_weights: Callable[[Path], list[str]],
    out_dir: str | Path,
    tracker: Tracker,
) -> AdapterCard:
    """Train the LoRA `parameters`, measure `eval_losses` (named, e.g. train and held-out)
    before and after, and write the adapter (`save_weights`, first file = the weights) with
    its card to `out_dir`."""
    before = eval_losses()
    losses = train_lora(
        parameters,
        batch_loss,
        steps=settings.steps,
        learning_rate=settings.learning_rate,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        tracker=tracker,
        desc=f"{spec.kind} {spec.backend}",
    )
    after = eval_losses()
    for name in before:
        log.info("%s %s loss %.4f -> %.4f", spec.kind, name, before[name], after[name])
    tracker.log_metrics(
        {
            f"{name}_loss_{when}": losses[name]
            for when, losses in (("before", before), ("after", after))
            for name in losses
        }
    )
    with atomic_directory(out_dir) as tmp:
        files = save_weights(tmp)
        card = AdapterCard(
            kind=spec.kind,
            backend=spec.backend,
            base_model=ModelRef(id=spec.source.id, revision=spec.source.revision, vq=spec.source.vq),
            subjects=spec.subjects,
            params=spec.params,
            steps_done=len(losses),
            losses=losses,
            loss_before=before,
            loss_after=after,
            adapter_files=files,
            adapter_sha256=sha256_file(tmp / files[0]),
            proxytune_version=__version__,
        )
        card.write(tmp / CARD_FILE)
    tracker.log_artifacts(out_dir, spec.kind)
    return card
