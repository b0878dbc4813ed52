"""LoRA training shared by supervisor and student: the loop, and the adapter it writes."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from proxytune import __version__
from proxytune.backends._base import ModelSource
from proxytune.core.contracts import CARD_FILE, AdapterCard, ModelRef, SubjectRef
from proxytune.core.fsutil import atomic_directory, sha256_file, sha256_json
from proxytune.core.params import TrainingParams
from proxytune.core.storage import ObjectStore, join
from proxytune.core.tracking import Tracker

log = logging.getLogger(__name__)


MicroBatches = Callable[[torch.Generator], Iterator[tuple[torch.Tensor, float]]]
"""Draws one batch with all its randomness from the generator and yields it as micro-batches:
(mean loss of the micro-batch, its share of the batch). Only one micro-batch's activations
are alive at a time, so the batch size never decides the peak memory."""


@dataclass(frozen=True)
class Checkpoints:
    """Where one training run keeps its checkpoints: `checkpoints/<key>/step-NNNNNNN/` in the
    object store, `key` hashing everything that decides the run (model, data, settings), so a
    re-run of the same step with the same inputs (a KFP retry, a new pod) finds them.

    A checkpoint is the LoRA weights, the optimizer and LR-scheduler states, the RNG states and
    the losses so far (`state.safetensors` + `state.json`, nothing pickled). `latest.json` is
    written last, so a half-written checkpoint is never resumed from; the newest `keep` stay."""

    store: ObjectStore
    key: str
    every: int
    keep: int

    LATEST: ClassVar[str] = "latest.json"

    @property
    def prefix(self) -> str:
        return join("checkpoints", self.key)

    def save(self, state: TrainingState) -> None:
        folder = join(self.prefix, f"step-{state.step:07d}")
        tensors, meta = state.to_files()
        self.store.put_bytes(join(folder, "state.safetensors"), save_safetensors(tensors))
        self.store.put_bytes(join(folder, "state.json"), json.dumps(meta).encode())
        self.store.put_bytes(join(self.prefix, self.LATEST), json.dumps({"folder": folder}).encode())
        folders = sorted(
            {key.rsplit("/", 1)[0] for key in self.store.list(self.prefix + "/") if "/step-" in key}
        )
        for old in folders[: -self.keep]:
            self.store.delete_prefix(old)
        log.info("checkpoint at step %d -> %s/%s", state.step, self.store.uri, folder)

    def latest(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        pointer = join(self.prefix, self.LATEST)
        if not self.store.exists(pointer):
            return None
        folder = json.loads(self.store.get_bytes(pointer))["folder"]
        tensors = load_safetensors(self.store.get_bytes(join(folder, "state.safetensors")))
        return tensors, json.loads(self.store.get_bytes(join(folder, "state.json")))


@dataclass
class TrainingState:
    """Everything a step of `train_lora` depends on, so training can stop and go on exactly."""

    step: int
    losses: list[float]
    parameters: Sequence[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator

    def to_files(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.parameters)}
        optimizer = self.optimizer.state_dict()
        for index, values in optimizer["state"].items():
            tensors.update({f"optimizer.{index}.{k}": v.cpu() for k, v in values.items()})
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        meta = {
            "step": self.step,
            "losses": self.losses,
            "param_groups": optimizer["param_groups"],
            "scheduler": self.scheduler.state_dict(),
        }
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.parameters):
                p.copy_(tensors[f"param.{i}"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, field = name.split(".", 2)
                state.setdefault(int(index), {})[field] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.scheduler.load_state_dict(meta["scheduler"])
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        self.step, self.losses = meta["step"], list(meta["losses"])


def train_lora(
    parameters: Sequence[torch.nn.Parameter],
    batch_loss: MicroBatches,
    *,
    steps: int,
    learning_rate: float,
    warmup_steps: int = 0,
    max_grad_norm: float,
    seed: int,
    tracker: Tracker,
    desc: str,
    checkpoints: Checkpoints | None = None,
) -> list[float]:
    """AdamW on `parameters` for `steps` steps, accumulating gradients over micro-batches, with
    a constant learning rate after a linear warm-up. The generator is seeded, so a run is
    reproducible; with `checkpoints` it resumes from the latest one and saves every
    `checkpoints.every` steps. Logs `train_loss` per step (a resumed run logs the earlier steps
    again, so its curve is whole); returns the losses."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    )
    state = TrainingState(0, [], parameters, optimizer, scheduler, torch.Generator().manual_seed(seed))
    saved = checkpoints.latest() if checkpoints else None
    if saved:
        state.restore(*saved)
        log.info("%s: resuming at step %d of %d from %s", desc, state.step, steps, checkpoints.store.uri)
        for step, loss in enumerate(state.losses):
            tracker.log_metric("train_loss", loss, step)
    every = max(1, steps // 10)
    with tqdm(
        range(state.step, steps), desc=desc, unit="step", mininterval=2.0, initial=state.step, total=steps
    ) as progress:
        for step in progress:
            total = 0.0
            for loss, share in batch_loss(state.generator):
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
                (loss * share).backward()
                total += loss.item() * share
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.losses.append(total)
            state.step = step + 1
            tracker.log_metric("train_loss", total, step)
            progress.set_postfix(loss=f"{total:.4f}", refresh=False)
            if step % every == 0 or step == steps - 1:
                log.info("%s step %d/%d loss %.4f", desc, step + 1, steps, total)
            if checkpoints and state.step % checkpoints.every == 0 and state.step < steps:
                checkpoints.save(state)
    return state.losses


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

    def checkpoints(self, settings: TrainingParams, store: ObjectStore | None) -> Checkpoints | None:
        """Checkpoints keyed by everything that decides this run, but how often it checkpoints."""
        if store is None or not settings.checkpoint_every:
            return None
        decided = {k: v for k, v in self.params.items() if k not in ("checkpoint_every", "checkpoints_kept")}
        key = sha256_json(
            {
                "kind": self.kind,
                "backend": self.backend,
                "source": [self.source.id, self.source.revision, self.source.vq],
                "subjects": [s.model_dump() for s in self.subjects],
                "params": decided,
            }
        )
        return Checkpoints(store, key, settings.checkpoint_every, settings.checkpoints_kept)


def tune_adapter(
    spec: AdapterSpec,
    settings: TrainingParams,
    parameters: Sequence[torch.nn.Parameter],
    batch_loss: MicroBatches,
    eval_losses: Callable[[], dict[str, float]],
    save_weights: Callable[[Path], list[str]],
    out_dir: str | Path,
    tracker: Tracker,
    store: ObjectStore | None = None,
) -> AdapterCard:
    """Train the LoRA `parameters`, measure `eval_losses` (named, e.g. train and held-out)
    before and after, and write the adapter (`save_weights`, first file = the weights) with
    its card to `out_dir`. With a `store`, training checkpoints there and resumes a run with
    the same spec (`spec.params` must name the training data, e.g. its content key)."""
    before = eval_losses()
    losses = train_lora(
        parameters,
        batch_loss,
        steps=settings.steps,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        tracker=tracker,
        desc=f"{spec.kind} {spec.backend}",
        checkpoints=spec.checkpoints(settings, store),
    )
    after = eval_losses()
    for name in before:
        log.info("%s %s loss %.4f -> %.4f", spec.kind, name, before[name], after[name])
    tracker.log_metrics(
        {
            f"{name}_loss_{when}": values[name]
            for when, values in (("before", before), ("after", after))
            for name in values
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
