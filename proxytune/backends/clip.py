"""CLIP encoders for CLIP-I and CLIP-T: `tiny-clip`, `clip-vit-b32`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from proxytune.backends._base import ImageEncoder, ModelSource, pixel_batch, seeded
from proxytune.backends._tokenizers import tiny_clip_tokenizer
from proxytune.core.registry import ENCODERS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    with seeded(1):
        model = CLIPModel(config)
    return model, tokenizer


class ClipEncoder(ImageEncoder):
    def __init__(self, name: str, source: ModelSource):
        self.name, self.source = name, source

    def _load(self, path: str | None, revision: str | None, device: torch.device) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        if path is None:
            model, tokenizer = _tiny_clip()
        else:
            model = CLIPModel.from_pretrained(path, revision=revision)
            tokenizer = CLIPTokenizer.from_pretrained(path, revision=revision)
        self.model, self.tokenizer, self.device = model.to(device).eval(), tokenizer, device
        self.size = model.config.vision_config.image_size

    def save(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = pixel_batch(images, self.size, self.size, CLIP_MEAN, CLIP_STD).to(self.device)
        features = self.model.get_image_features(pixel_values=pixels).pooler_output
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(
            self.device
        )
        features = self.model.get_text_features(**batch).pooler_output
        return F.normalize(features.float(), dim=-1).cpu()


ENCODERS.register(
    "tiny-clip", lambda: ClipEncoder("tiny-clip", ModelSource("tiny:clip")), "random-weight CLIP for tests"
)
ENCODERS.register(
    "clip-vit-b32",
    lambda: ClipEncoder("clip-vit-b32", ModelSource("openai/clip-vit-base-patch32")),
    "CLIP ViT-B/32, the DreamBench CLIP-I / CLIP-T encoder",
)
