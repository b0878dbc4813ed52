"""LoRA training shared by supervisor and student: the loop, and the adapter it writes."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from proxytune import __version__
from proxytune.backends._base import ModelSource
from proxytune.config import StudentParams, SupervisorParams
from proxytune.contracts import CARD_FILE, AdapterCard, ModelRef
from proxytune.fsutil import atomic_directory, sha256_file
from proxytune.tracking import Tracker

log = logging.getLogger(__name__)


def train_lora(
    parameters: Sequence[torch.nn.Parameter],
    batch_loss: Callable[[torch.Generator], torch.Tensor],
    *,
    steps: int,
    learning_rate: float,
    max_grad_norm: float,
    seed: int,
    tracker: Tracker,
    desc: str,
) -> list[float]:
    """AdamW on `parameters` for `steps` steps; `batch_loss(generator)` draws a batch and
    returns its loss, taking all its randomness from `generator` (seeded: reproducible).
    Logs `train_loss` per step; returns the losses."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    every = max(1, steps // 10)
    with tqdm(range(steps), desc=desc, unit="step", mininterval=2.0) as progress:
        for step in progress:
            loss = batch_loss(generator)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tracker.log_metric("train_loss", losses[-1], step)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if step % every == 0 or step == steps - 1:
                log.info("%s step %d/%d loss %.4f", desc, step + 1, steps, losses[-1])
    return losses


@torch.no_grad()
def fixed_loss(batch_loss: Callable[[torch.Generator], torch.Tensor], seeds: Sequence[int]) -> float:
    """Mean loss over fixed draws: comparable before and after training."""
    return sum(batch_loss(torch.Generator().manual_seed(s)).item() for s in seeds) / len(seeds)


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is for; recorded in its card (`proxytune.json`)."""

    kind: str
    backend: str
    source: ModelSource
    subjects: list[str]
    identifier: str
    class_noun: str
    params: dict[str, Any]


def tune_adapter(
    spec: AdapterSpec,
    settings: SupervisorParams | StudentParams,
    parameters: Sequence[torch.nn.Parameter],
    batch_loss: Callable[[torch.Generator], torch.Tensor],
    eval_loss: Callable[[], float],
    save_weights: Callable[[Path], list[str]],
    out_dir: str | Path,
    tracker: Tracker,
) -> AdapterCard:
    """Train the LoRA `parameters`, measure `eval_loss` before and after, and write the
    adapter (`save_weights`, first file = the weights) with its card to `out_dir`."""
    before = eval_loss()
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
    after = eval_loss()
    log.info("%s held-out loss %.4f -> %.4f", spec.kind, before, after)
    tracker.log_metrics({"eval_loss_before": before, "eval_loss_after": after})
    with atomic_directory(out_dir) as tmp:
        files = save_weights(tmp)
        card = AdapterCard(
            kind=spec.kind,
            backend=spec.backend,
            base_model=ModelRef(id=spec.source.id, revision=spec.source.revision),
            subjects=spec.subjects,
            identifier=spec.identifier,
            class_noun=spec.class_noun,
            params=spec.params,
            steps_done=len(losses),
            losses=losses,
            eval_loss_before=before,
            eval_loss_after=after,
            adapter_files=files,
            adapter_sha256=sha256_file(tmp / files[0]),
            proxytune_version=__version__,
        )
        card.write(tmp / CARD_FILE)
    tracker.log_artifacts(out_dir, spec.kind)
    return card
