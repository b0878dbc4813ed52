"""The LoRA optimisation loop shared by supervisor and student tuning."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

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
