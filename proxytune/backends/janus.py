"""Janus / Janus-Pro students (transformers `JanusForConditionalGeneration`).

Token layout (AR-MODELS.md): "<|User|>: {prompt}\\n\\n<|Assistant|>:" then
`<begin_of_image>`, then the VQ codes of the image, produced by `generation_head` on the
language model's hidden states and fed back through `generation_embeddings` + `aligner`.
The unconditional prompt (CFG) keeps BOS and `<begin_of_image>` and pads everything else,
exactly as transformers' image-mode `generate` builds it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from proxytune.backends._base import ModelSource, StudentBackend, seeded, training_dtype
from proxytune.backends._tokenizers import JANUS_BOI, JANUS_IMAGE, tiny_janus_tokenizer
from proxytune.images import to_pil
from proxytune.registry import STUDENTS

PROMPT_FORMAT = "<|User|>: {prompt}\n\n<|Assistant|>:"


def _tiny_janus():
    """A real Janus model with small configs and random weights: 32 px, 4x4 codes, 64-code VQ."""
    from transformers import (
        GenerationConfig,
        JanusConfig,
        JanusForConditionalGeneration,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    tokenizer = tiny_janus_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = JanusVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        num_image_tokens=16,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=64,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 2, 2],
        num_res_blocks=1,
        projection_dim=32,
        image_token_embed_dim=32,
        num_hidden_layers=1,
    )
    config = JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(JANUS_IMAGE),
    )
    with seeded(0):
        model = JanusForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(JANUS_BOI)},
    )
    return model, tokenizer


class JanusStudent(StudentBackend):
    lora_target_modules = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj)"

    def __init__(self, name: str, source: ModelSource):
        self.name, self.source = name, source

    def load(self, device: torch.device, source: ModelSource | None = None) -> None:
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        source = source or self.source
        if source.is_tiny:
            model, tokenizer = _tiny_janus()
        else:
            path = source.local_or_hub()
            model = JanusForConditionalGeneration.from_pretrained(
                path, revision=source.revision, torch_dtype=training_dtype(device)
            )
            tokenizer = AutoTokenizer.from_pretrained(path, revision=source.revision)
        tokenizer.padding_side = "left"
        model.requires_grad_(False)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.boi_id = tokenizer.convert_tokens_to_ids(JANUS_BOI)
        self.resolution = model.config.vision_config.image_size

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vq = self.model.model.vqmodel
        tokens = vq.encode(pixels.to(self.device, vq.dtype)).image_tokens
        return tokens.view(pixels.shape[0], -1).long()

    def tokenize(self, prompts: Sequence[str], unconditional: Sequence[bool]) -> dict[str, torch.Tensor]:
        texts = [PROMPT_FORMAT.format(prompt=p) + JANUS_BOI for p in prompts]
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        ids, mask = batch.input_ids, batch.attention_mask
        keep = (ids == self.tokenizer.bos_token_id) | (ids == self.boi_id) | (mask == 0)
        drop = torch.tensor(list(unconditional), dtype=torch.bool)[:, None] & ~keep
        ids = ids.masked_fill(drop, self.tokenizer.pad_token_id)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def nll(self, inputs: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        model = self.model
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        codes = codes.to(self.device)
        text = model.get_input_embeddings()(ids)
        image = model.prepare_embeddings_for_image_generation(codes[:, :-1]).to(text.dtype)
        full_mask = torch.cat([mask, mask.new_ones(codes.shape[0], codes.shape[1] - 1)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with self._autocast():
            hidden = model.model.language_model(
                inputs_embeds=torch.cat([text, image], dim=1),
                attention_mask=full_mask,
                position_ids=positions,
            ).last_hidden_state
            logits = model.model.generation_head(hidden[:, ids.shape[1] - 1 :])
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], guidance_scale: float, seed: int) -> list[Image.Image]:
        inputs = self.tokenize(prompts, [False] * len(prompts))
        torch.manual_seed(seed)
        with self._autocast():
            codes = self.model.generate(
                **inputs, generation_mode="image", do_sample=True, guidance_scale=guidance_scale
            )
            pixels = self.model.decode_image_tokens(codes)
        return to_pil(pixels, channels_last=True)


STUDENTS.register(
    "tiny-janus",
    lambda: JanusStudent("tiny-janus", ModelSource("tiny:janus")),
    "random-weight Janus (32 px, 16 tokens) for tests and the CPU demo",
)
STUDENTS.register(
    "janus-pro-1b",
    lambda: JanusStudent("janus-pro-1b", ModelSource("deepseek-community/Janus-Pro-1B")),
    "Janus-Pro 1B (384 px, 576 tokens)",
)
STUDENTS.register(
    "janus-pro-7b",
    lambda: JanusStudent("janus-pro-7b", ModelSource("deepseek-community/Janus-Pro-7B")),
    "Janus-Pro 7B (384 px, 576 tokens)",
)
