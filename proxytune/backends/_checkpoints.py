"""Where the backends' weights and architectures come from: the published configurations kept
as data in `configs/` (the `random:<config>` builds and the real-shape twins use them), and
`from_pretrained` with the checks a real checkpoint needs (every weight present, shapes that
fit, the hub commit that was read)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from proxytune.backends._base import ModelSource, hub_commit

RANDOM_PREFIX = "random:"


def published_config(name: str) -> dict[str, Any]:
    """A model's published configuration, kept as data in `proxytune/backends/configs/`."""
    path = resources.files("proxytune.backends") / "configs" / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no published configuration named {name!r}")
    return json.loads(path.read_text(encoding="utf-8"))


def random_config_name(source: ModelSource) -> str | None:
    """`random:<config>` sources build the published architecture with random weights."""
    return source.id.removeprefix(RANDOM_PREFIX) if source.id.startswith(RANDOM_PREFIX) else None


def load_pretrained(
    model_class,
    source: ModelSource,
    dtype: torch.dtype,
    optional: str | None = None,
    repeated: str | None = None,
) -> tuple[torch.nn.Module, str | None]:
    """`from_pretrained` with the missing-weights check; returns the model and the resolved
    revision (the hub commit when loaded from the hub, else the requested revision).

    `optional`: a regex of weights the release does not hold (they keep their initial values);
    `repeated`: a regex of weights the release stores for fewer rows than the model has (its
    rows repeat, as Lumina-mGPT's per-shard q/k norms): read back and repeated to fit."""
    from transformers.utils import logging as transformers_logging

    path = source.local_or_hub()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report: checked below, with clearer errors
    try:
        model, info = model_class.from_pretrained(
            path,
            revision=source.revision,
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=repeated is not None,
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = [k for k in info.get("missing_keys") or [] if not (optional and re.fullmatch(optional, k))]
    if missing:
        raise ValueError(
            f"{source.id}: the checkpoint lacks {len(missing)} weight(s) of {model_class.__name__}, "
            f"e.g. {sorted(missing)[:3]}; is it the right model?"
        )
    mismatched = [entry[0] for entry in info.get("mismatched_keys") or []]
    unfit = [k for k in mismatched if not (repeated and re.fullmatch(repeated, k))]
    if unfit:
        raise ValueError(f"{source.id}: {len(unfit)} weight(s) have the wrong shape, e.g. {unfit[:3]}")
    if mismatched:
        _repeat_rows(model, checkpoint_tensors(path, source.revision, mismatched))
    return model, _commit(path, source.revision)


def checkpoint_tensors(path: str, revision: str | None, keys: list[str]) -> dict[str, torch.Tensor]:
    """Some tensors of a (sharded) safetensors checkpoint, read without loading the rest."""
    from safetensors import safe_open
    from transformers.utils.hub import cached_file

    index = cached_file(
        path, "model.safetensors.index.json", revision=revision, _raise_exceptions_for_missing_entries=False
    )
    shards = (
        json.loads(Path(index).read_text())["weight_map"]
        if index
        else dict.fromkeys(keys, "model.safetensors")
    )
    tensors = {}
    for key in keys:
        with safe_open(cached_file(path, shards[key], revision=revision), "pt") as f:
            tensors[key] = f.get_tensor(key)
    return tensors


def _repeat_rows(model: torch.nn.Module, stored: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    for key, value in stored.items():
        target = parameters[key]
        if target.shape[0] % value.shape[0] or target.shape[1:] != value.shape[1:]:
            raise ValueError(
                f"{key}: stored {tuple(value.shape)} cannot be repeated to {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(value.repeat_interleave(target.shape[0] // value.shape[0], dim=0))


def _commit(path: str, revision: str | None) -> str | None:
    """The hub commit read, or for a local folder the revision asked for."""
    return revision if Path(path).is_dir() else hub_commit(path, revision)
