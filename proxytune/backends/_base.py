"""What a backend of each kind provides, and helpers they share.

The stage code (`proxytune.supervisor`, `proxytune.student`, `proxytune.evaluate`) is
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

    def local_or_hub(self) -> str:
        """A path or hub id that `from_pretrained` accepts (s3:// sources are staged first)."""
        from proxytune.weights import stage_weights

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
    source: ModelSource

    @abstractmethod
    def load(self, device: torch.device) -> None: ...

    @abstractmethod
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised features."""

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no text tower")


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
