"""DINO ViT encoders for the DINO metric: `tiny-dino`, `dino-vits16`.

Features are the CLS token of the last hidden state after the final LayerNorm (not the
pooler), images resized to 256/224 of the crop (bicubic), center-cropped, ImageNet mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from proxytune.backends._base import ImageEncoder, ModelSource, pixel_batch, seeded
from proxytune.core.registry import ENCODERS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoEncoder(ImageEncoder):
    def __init__(self, name: str, source: ModelSource):
        self.name, self.source = name, source

    def _load(self, path: str | None, revision: str | None, device: torch.device) -> None:
        from transformers import ViTConfig, ViTModel

        if path is None:
            config = ViTConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            )
            with seeded(2):
                model = ViTModel(config, add_pooling_layer=False)
        else:
            model = ViTModel.from_pretrained(path, revision=revision, add_pooling_layer=False)
        self.model, self.device = model.to(device).eval(), device
        self.size = model.config.image_size

    def save(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        resize = round(self.size * 256 / 224)
        pixels = pixel_batch(images, resize, self.size, IMAGENET_MEAN, IMAGENET_STD).to(self.device)
        cls = self.model(pixel_values=pixels).last_hidden_state[:, 0]
        return F.normalize(cls.float(), dim=-1).cpu()


ENCODERS.register(
    "tiny-dino", lambda: DinoEncoder("tiny-dino", ModelSource("tiny:dino")), "random-weight ViT for tests"
)
ENCODERS.register(
    "dino-vits16",
    lambda: DinoEncoder("dino-vits16", ModelSource("facebook/dino-vits16")),
    "DINO ViT-S/16, the DreamBench DINO encoder",
)
