"""Lumina-mGPT students: the Chameleon architecture (transformers `ChameleonForConditionalGeneration`)
with Chameleon's VQGAN, in Lumina-mGPT's image token layout.

Sequence (Alpha-VLLM/Lumina-mGPT's reference code):
    <s> "Generate an image of 768x768 according to the following prompt:\\n{prompt}" <reserved08706>
    <racm3:break> <height> <width>  48 x (48 image tokens, <reserved08799>)  <eoss> <reserved08706>
- Image tokens are the vocabulary entries named `IMGIMG<digits as letters A-J>Z`; the code of
  each is read from its name. Size tokens are `<reserved0{8800 + n}>` for n grids of 32 px.
- proxytune puts begin-of-image and the two size tokens in the prompt (the reference samples
  them, unguided, right after the separator): the size is the model's native one, so fixing it
  is the same as conditioning on it. The loss covers the rows with their end-of-line tokens,
  end-of-image and the closing separator (the reference's labels), plus its z-loss (1e-5).
- The unconditional (CFG) prompt is the sequence from begin-of-image on: no BOS, no text.
- Sampling: CFG 4.0 on raw logits, image top-k 2000, temperature 1.0; only image tokens inside
  the image, end-of-line forced after each row (transformers' Chameleon masks image tokens out
  of its logits, so the shared loop computes them from `lm_head` itself, on the code rows only).

Weights: the released language model (bf16 safetensors, Chameleon layout) stores each
attention's q/k LayerNorm once per model-parallel shard ([1, 128]); transformers wants one per
head ([32, 128]), so they are repeated on load. The release has no VQ weights: the VQGAN,
with its decoder, comes from `student.vq_source` (a folder made by `proxytune convert-vqgan`
from Meta's Chameleon tokenizer), by default the `vqgan/` folder beside the model. It runs in
fp32, as the reference does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from proxytune.backends._ar import ARStudent, ImageBlock
from proxytune.backends._base import ModelSource, seeded
from proxytune.backends._checkpoints import load_pretrained, published_config, random_config_name
from proxytune.backends._tokenizers import byte_level_tokenizer
from proxytune.backends._vqgan import ChameleonVQGAN
from proxytune.core.params import Sampling
from proxytune.core.registry import STUDENTS

PROMPT_FORMAT = "Generate an image of {width}x{height} according to the following prompt:\n{prompt}"
SEPARATOR, BEGIN_OF_IMAGE, END_OF_IMAGE, END_OF_LINE = (
    "<reserved08706>",
    "<racm3:break>",
    "<eoss>",
    "<reserved08799>",
)
IMAGE_TOKEN = re.compile(r"^IMGIMG([A-J]+)Z$")
VQ_FOLDER = "vqgan"
QK_NORMS = re.compile(r"model\.layers\.\d+\.self_attn\.[qk]_norm\.(weight|bias)")


def image_token_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def image_token_codes(vocab: dict[str, int]) -> torch.Tensor:
    """(C,) token id of every VQ code, read from the `IMGIMG...Z` names of the vocabulary."""
    codes = {}
    for name, token in vocab.items():
        match = IMAGE_TOKEN.match(name)
        if match:
            codes[int("".join(str(ord(c) - ord("A")) for c in match.group(1)))] = token
    if sorted(codes) != list(range(len(codes))):
        raise ValueError(f"the tokenizer's image tokens do not cover codes 0..{len(codes) - 1}")
    return torch.tensor([codes[c] for c in range(len(codes))])


def lumina_tokenizer(spec: dict):
    image = spec["image_tokens"]
    tokens = {image_token_name(c): image["first_id"] + c for c in range(image["count"])}
    return byte_level_tokenizer({**spec["tokens"], **tokens}, spec["bos"], spec["eos"], spec["pad"])


def random_lumina(name: str, layers: int | None = None, device="cpu", dtype: torch.dtype = torch.float32):
    """The published architecture `name` with random weights: (language model, VQGAN, tokenizer).

    `layers` cuts the language model's depth (real-shape twins)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, GenerationConfig

    spec = published_config(name)
    tokenizer = lumina_tokenizer(spec["tokenizer"])
    config = ChameleonConfig(**spec["config"], vocabulary_map=tokenizer.get_vocab())
    if layers is not None:
        config.num_hidden_layers = layers
    with seeded(0), torch.device(device):
        model = ChameleonForConditionalGeneration._from_config(config, dtype=dtype)
        vqgan = ChameleonVQGAN.from_config_dict(spec["vq_config"])
    del model.model.vqmodel  # the release has none: the VQGAN below replaces it
    model.generation_config = GenerationConfig(**spec["generation_config"])
    return model, vqgan, tokenizer


class LuminaStudent(ARStudent):
    sampling = Sampling(guidance_scale=4.0, temperature=1.0, top_k=2000, top_p=1.0)
    lora_target_modules = r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    encoding = "chameleon-vqgan-argmin-fp32"
    codebook_l2_norm = False
    z_loss = 1e-5
    separate_vq = True

    def _load(
        self, source: ModelSource, dtype: torch.dtype, layers: int | None, device: torch.device
    ) -> None:
        config_name = random_config_name(source)
        if config_name:
            model, vqgan, tokenizer = random_lumina(config_name, layers, device, dtype)
            self.revision = None
        else:
            model, tokenizer = self._from_release(source, dtype)
            vqgan = ChameleonVQGAN.load(self._vq_folder(source))
        self.model, self.vqgan, self.tokenizer = model, vqgan.float().to(device), tokenizer
        self._layout(tokenizer.get_vocab())

    def _from_release(self, source: ModelSource, dtype: torch.dtype):
        from transformers import AutoTokenizer, ChameleonForConditionalGeneration

        model, self.revision = load_pretrained(
            ChameleonForConditionalGeneration,
            source,
            dtype,
            optional=r"model\.vqmodel\..*",
            repeated=QK_NORMS.pattern,
        )
        del model.model.vqmodel
        return model, AutoTokenizer.from_pretrained(source.local_or_hub(), revision=source.revision)

    def _vq_folder(self, source: ModelSource) -> str:
        if source.vq:
            return ModelSource(source.vq).local_folder()
        beside = Path(source.local_folder()) / VQ_FOLDER
        if not beside.is_dir():
            raise ValueError(
                f"{self.name}: no Chameleon VQGAN beside {source.id}; set student.vq_source to a folder "
                "made by `proxytune convert-vqgan` from Meta's Chameleon tokenizer (vqgan.ckpt, vqgan.yaml)"
            )
        return str(beside)

    def _layout(self, vocab: dict[str, int]) -> None:
        """Ids by name from the tokenizer; the image grid from the VQGAN and the resolution."""
        names = (SEPARATOR, BEGIN_OF_IMAGE, END_OF_IMAGE, END_OF_LINE)
        missing = [n for n in names if n not in vocab]
        if missing:
            raise ValueError(f"{self.name}: the tokenizer lacks Lumina-mGPT's tokens {missing}")
        self.separator, self.begin_of_image, self.end_of_image, end_of_line = (vocab[n] for n in names)
        self.code_ids = image_token_codes(vocab)
        if self.code_ids.numel() != self.vqgan.config.num_embeddings:
            raise ValueError(
                f"{self.name}: {self.code_ids.numel()} image tokens for a VQGAN of "
                f"{self.vqgan.config.num_embeddings} codes"
            )
        image = published_config(self.name)["image"]  # the backend's native size
        self.resolution = image["resolution"]
        grids = self.resolution // image["size_unit"]
        size_token = f"<reserved{8800 + grids:05d}>"
        if size_token not in vocab:
            raise ValueError(f"{self.name}: the tokenizer lacks the size token {size_token}")
        self.size_id = vocab[size_token]
        side = self.resolution // self.vqgan.downsampling
        self.block = ImageBlock(
            side, side, end_of_row=(end_of_line,), end=(self.end_of_image, self.separator)
        )
        self.bos_id = self.tokenizer.bos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.bos_id if pad is None else pad  # padding is always masked out

    def save(self, folder: str | Path) -> None:
        """The release's layout: sharded safetensors with per-shard q/k norms, the tokenizer,
        and the converted VQGAN in `vqgan/`."""
        state = {}
        for key, value in self.model.state_dict().items():
            if QK_NORMS.fullmatch(key):
                if not torch.equal(value, value[:1].expand_as(value)):
                    raise ValueError(f"{key} differs between heads: not representable in the release layout")
                value = value[:1]
            state[key] = value
        self.model.save_pretrained(folder, state_dict=state, max_shard_size="1GB")
        self.tokenizer.save_pretrained(folder)
        self.vqgan.save(Path(folder) / VQ_FOLDER)

    def prompt_ids(self, prompt: str, unconditional: bool) -> list[int]:
        image = [self.begin_of_image, self.size_id, self.size_id]
        if unconditional:
            return image
        text = PROMPT_FORMAT.format(width=self.resolution, height=self.resolution, prompt=prompt)
        return [
            self.bos_id,
            *self.tokenizer(text, add_special_tokens=False).input_ids,
            self.separator,
            *image,
        ]

    def embed_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def embed_block(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def transformer(self) -> torch.nn.Module:
        return self.model.model

    def head(self) -> torch.nn.Module:
        return self.model.lm_head

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`lm_head` on the 8192 image-token rows only: 8x less work than the whole vocabulary."""
        weight = self.model.lm_head.weight
        cached = getattr(self, "_code_rows", None)
        if cached is None or cached[0] is not weight or cached[1] != weight._version:  # changed in place
            self._code_rows = (weight, weight._version, weight[self.code_ids])
        return F.linear(hidden, self._code_rows[2])

    def vq_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return self.vqgan.latents(pixels.float())

    def codebook(self) -> torch.Tensor:
        return self.vqgan.quantize.embedding.weight

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return self.vqgan.decode(codes, self.block.rows, self.block.cols)


STUDENTS.register(
    "tiny-lumina",
    lambda: LuminaStudent("tiny-lumina", ModelSource("random:tiny-lumina")),
    "random-weight Lumina-mGPT (Chameleon; 256 px, 16x16 tokens with row tokens) for tests and the CPU demo",
)
STUDENTS.register(
    "lumina-mgpt-7b-768",
    lambda: LuminaStudent(
        "lumina-mgpt-7b-768", ModelSource(published_config("lumina-mgpt-7b-768")["hub_id"])
    ),
    "Lumina-mGPT 7B (768 px, 48x48 tokens; CFG 4, image top-k 2000) — the paper's main student",
)
