"""Janus / Janus-Pro students (transformers `JanusForConditionalGeneration`).

Token layout (deepseek-ai/Janus's reference code): BOS,
"<|User|>: {prompt}\\n\\n<|Assistant|>:", `<begin_of_image>`,
then the 576 VQ codes of a 384 px image (24 x 24), predicted by `generation_head` on the
language model's hidden states and fed back through `generation_embeddings` + aligner. The
unconditional prompt (CFG) keeps BOS and `<begin_of_image>` and puts the `<｜▁pad▁｜>` token
everywhere between, as DeepSeek's reference does (those pads are attended to).

Where the reference differs from transformers' defaults, the reference wins:
- sampling: all 16384 codes at temperature 1 with CFG 5 (`generate` would add top-k 50);
- VQ encoding: nearest code after L2-normalising latents and codebook (the tokenizer's
  `codebook_l2_norm`), in fp32; transformers' quantizer takes the raw argmin;
- the LM head is its own weight: `tie_word_embeddings` is forced off (JanusConfig defaults
  it on, and a re-tie would overwrite the released head).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from proxytune.backends._ar import ARStudent, ImageBlock
from proxytune.backends._base import ModelSource, seeded
from proxytune.backends._checkpoints import load_pretrained, published_config, random_config_name
from proxytune.backends._tokenizers import byte_level_tokenizer
from proxytune.core.params import Sampling
from proxytune.core.registry import STUDENTS

if TYPE_CHECKING:
    from transformers import GenerationConfig

PROMPT_FORMAT = "<|User|>: {prompt}\n\n<|Assistant|>:"
BEGIN_OF_IMAGE = "<begin_of_image>"
CFG_PAD = "<｜▁pad▁｜>"


def random_janus(
    name: str,
    layers: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """The published architecture `name` (configs/<name>.json) with random weights, its
    generation config and a byte-level tokenizer with the real special-token ids.

    `layers` cuts the language model's and the vision encoder's depth (real-shape twins)."""
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration

    spec = published_config(name)
    config = JanusConfig(**spec["config"])
    config.tie_word_embeddings = False
    if layers is not None:
        config.text_config.num_hidden_layers = layers
        config.vision_config.num_hidden_layers = layers
    with seeded(0), torch.device(device):
        model = JanusForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(**spec["generation_config"])
    return model, byte_level_tokenizer(**spec["tokenizer"])


def check_special_tokens(tokenizer, generation: GenerationConfig, where: str) -> dict[str, int]:
    """BOS, CFG pad and `<begin_of_image>` as the tokenizer has them, after checking that the
    checkpoint's generation config uses the same ids; a clear error names any mismatch."""
    vocab = tokenizer.get_vocab()
    ours = {
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": vocab.get(CFG_PAD),
        "boi_token_id": vocab.get(BEGIN_OF_IMAGE),
    }
    theirs = {
        "bos_token_id": generation.bos_token_id,
        "pad_token_id": generation.pad_token_id,
        "boi_token_id": (getattr(generation, "generation_kwargs", None) or {}).get("boi_token_id"),
    }
    wrong = [
        f"{k}: tokenizer {ours[k]} vs generation_config {theirs[k]}" for k in ours if ours[k] != theirs[k]
    ]
    if wrong or None in ours.values():
        raise ValueError(
            f"{where}: tokenizer and generation config disagree on special tokens: {'; '.join(wrong)}"
        )
    return ours


class JanusStudent(ARStudent):
    sampling = Sampling(guidance_scale=5.0, temperature=1.0, top_k=0, top_p=1.0)
    lora_target_modules = r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    encoding = "janus-vq-l2norm-argmin-fp32"
    codebook_l2_norm = True

    def _load(
        self, source: ModelSource, dtype: torch.dtype, layers: int | None, device: torch.device
    ) -> None:
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        config_name = random_config_name(source)
        if config_name:
            model, tokenizer = random_janus(config_name, layers, device, dtype)
            self.revision = None
        else:
            model, self.revision = load_pretrained(JanusForConditionalGeneration, source, dtype)
            tokenizer = AutoTokenizer.from_pretrained(source.local_or_hub(), revision=source.revision)
            model.config.tie_word_embeddings = False
        ids = check_special_tokens(tokenizer, model.generation_config, source.id)
        self.bos_id, self.cfg_pad_id, self.boi_id = (
            ids["bos_token_id"],
            ids["pad_token_id"],
            ids["boi_token_id"],
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.cfg_pad_id
        self.model, self.tokenizer = model, tokenizer
        vision, vq = model.config.vision_config, model.config.vq_config
        side = vision.image_size // vision.patch_size
        self.resolution = vision.image_size
        self.block = ImageBlock(side, side)
        self.code_ids = torch.arange(vq.num_embeddings)

    def save(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def prompt_ids(self, prompt: str, unconditional: bool) -> list[int]:
        ids = self.tokenizer(PROMPT_FORMAT.format(prompt=prompt) + BEGIN_OF_IMAGE).input_ids
        if ids[0] != self.bos_id or ids[-1] != self.boi_id:
            raise ValueError(f"{self.name}: the tokenizer must add BOS and keep {BEGIN_OF_IMAGE} whole")
        return [ids[0], *[self.cfg_pad_id] * (len(ids) - 2), ids[-1]] if unconditional else ids

    def embed_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def embed_block(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.prepare_embeddings_for_image_generation(ids)

    def transformer(self) -> torch.nn.Module:
        return self.model.model.language_model

    def head(self) -> torch.nn.Module:
        return self.model.model.generation_head

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.block_logits(hidden)  # the head's outputs are the codes

    def vq_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        vq = self.model.model.vqmodel
        return vq.quant_conv(vq.encoder(pixels.to(vq.dtype)))

    def codebook(self) -> torch.Tensor:
        return self.model.model.vqmodel.quantize.embedding.weight

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.model.vqmodel.decode(codes)


STUDENTS.register(
    "tiny-janus",
    lambda: JanusStudent("tiny-janus", ModelSource("random:tiny-janus")),
    "random-weight Janus (32 px, 16 tokens) for tests and the CPU demo",
)
for _size in ("1b", "7b"):
    STUDENTS.register(
        f"janus-pro-{_size}",
        lambda name=f"janus-pro-{_size}": JanusStudent(name, ModelSource(published_config(name)["hub_id"])),
        f"Janus-Pro {_size.upper()} (384 px, 576 tokens; CFG 5, all codes, temperature 1)",
    )
