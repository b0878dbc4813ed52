"""What a backend of each kind provides, and helpers they share.

The stage code (`proxytune.stages.supervisor`, `proxytune.stages.student`, `proxytune.stages.evaluate`) is
model-agnostic: it owns loops, batching, caching, logging and file formats; a family
module only says how to load its model, encode, compute its loss and sample. The AR
students' shared core (prompts, loss, the sampling loop) is `proxytune.backends._ar`.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a hub id (with revision), a local folder, an s3:// prefix,
    `tiny:<name>` (supervisors) or `random:<config>` (students) for random-weight models
    built from configs. `vq` locates a VQ tokenizer released apart from the model
    (Lumina-mGPT's Chameleon VQGAN), in any of the same forms."""

    id: str
    revision: str | None = None
    vq: str | None = None

    @property
    def is_tiny(self) -> bool:
        return self.id.startswith("tiny:")

    @property
    def is_random(self) -> bool:
        """Random weights (`tiny:` or `random:`): scores from such a model test the plumbing."""
        return self.id.startswith(("tiny:", "random:"))

    def local_or_hub(self) -> str:
        """A path or hub id that `from_pretrained` accepts (s3:// sources are staged first)."""
        from proxytune.core.weights import stage_weights

        return stage_weights(self.id) if self.id.startswith("s3://") else self.id

    def local_folder(self) -> str:
        """A local folder with the files: staged from s3://, or the hub snapshot (cache first)."""
        path = self.local_or_hub()
        if Path(path).is_dir():
            return path
        from huggingface_hub import snapshot_download

        return snapshot_download(path, revision=self.revision)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_dtype(device: torch.device) -> torch.dtype:
    """Frozen base weights: bf16 on GPU (LoRA weights stay fp32), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed global RNG state, restoring the previous one afterwards.

    Tiny models are built inside it, so every process builds bit-identical random weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ImageEncoder(ABC):
    """A frozen feature extractor for evaluation (CLIP or DINO style)."""

    name: str
    source: ModelSource  # the registered default
    loaded_source: ModelSource  # what `load` loaded; revision: the hub commit, "local" or None (tiny)

    def load(self, device: torch.device, source: ModelSource | None = None) -> None:
        """Load the weights from `source` (default: the registered one), so an air-gapped
        cluster can point at a staged copy; records what was loaded in `loaded_source`."""
        source = source or self.source
        path = None if source.is_tiny else source.local_or_hub()
        if path is not None and not Path(path).is_dir() and not _is_hub_id(path):
            raise FileNotFoundError(
                f"{self.name}: no folder {source.id!r} "
                "(an encoder's weights source is a hub id, a folder or an s3:// prefix)"
            )
        try:
            self._load(path, source.revision, device)
        except OSError as error:  # transformers' message names neither the encoder nor the source
            raise OSError(f"{self.name}: cannot load weights from {source.id!r}: {error}") from error
        self.loaded_source = ModelSource(source.id, _loaded_revision(path, source.revision))

    @abstractmethod
    def _load(self, path: str | None, revision: str | None, device: torch.device) -> None:
        """Load from a folder or hub id (`from_pretrained`), or build the tiny model when `path` is None."""

    @abstractmethod
    def save(self, folder: str | Path) -> None:
        """Write the loaded model in its hub folder layout, which `load` reads back."""

    @abstractmethod
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised features."""

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no text tower")

    def describe(self) -> dict[str, str | None]:
        """What evaluation outputs record about the loaded encoder."""
        return {
            "backend": self.name,
            "source": self.loaded_source.id,
            "revision": self.loaded_source.revision,
        }


def _is_hub_id(path: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def _loaded_revision(path: str | None, revision: str | None) -> str | None:
    """The commit of hub weights (from the cache path they were read from), "local" for a folder,
    None for a tiny model built from its config."""
    if path is None:
        return None
    return "local" if Path(path).is_dir() else hub_commit(path, revision)


def hub_commit(path: str, revision: str | None) -> str | None:
    """The commit of hub weights, from the cache path their config was read from."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    return extract_commit_hash(cached_file(path, "config.json", revision=revision), None) or revision


def pixel_batch(
    images: Sequence[Image.Image], resize: int, crop: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Encoder preprocessing: shortest side to `resize` (bicubic), center crop, normalise."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = resize / min(image.size)
        width, height = max(crop, round(image.width * scale)), max(crop, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - crop) // 2, (height - crop) // 2
        arrays.append(np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return (batch - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def write_adapter_config(out_dir: str | Path, lora_config) -> str:
    """`adapter_config.json` in peft's format, for adapters saved in another weight layout."""
    Path(out_dir, "adapter_config.json").write_text(
        json.dumps(lora_config.to_dict(), indent=2, default=sorted)
    )
    return "adapter_config.json"
