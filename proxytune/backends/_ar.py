"""The model-agnostic core of the AR students: prompts, image blocks, loss and sampling.

A family module (`janus.py`, `lumina.py`) subclasses `ARStudent` and says only how its
model and tokenizer are loaded, how a prompt becomes token ids, how tokens are embedded,
which head gives logits, and how images become VQ codes and back. Everything else is here,
once, for every student:

- left-padded prompt batches, with each family's unconditional (CFG) prompt;
- the teacher-forced loss over the image block, its cross-entropy computed in chunks of
  positions so a 65536-way head over 2356 tokens never materialises at once;
- `sample_codes`: the KV-cached sampling loop, with the conditional and unconditional
  branches of several images as rows of one batch, per-image seeds and explicit
  top-k/top-p/temperature (`proxytune.core.sampling`); `reference_codes` is the slow textbook loop
  (no cache, one pass per branch) it is checked and benchmarked against.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from proxytune.backends._base import ModelSource, training_dtype
from proxytune.core.images import to_pil
from proxytune.core.params import Sampling
from proxytune.core.sampling import code_distribution, draw, seed_uniforms

log = logging.getLogger(__name__)
LOSS_CHUNK = 256  # positions per cross-entropy chunk
PAD_MULTIPLE = 64  # prompt batches are left-padded to a multiple of this


@dataclass(frozen=True)
class ImageBlock:
    """The tokens of one image after its prompt: `rows x cols` codes in raster order, with
    fixed structural tokens after each row and at the end (Lumina-mGPT's end-of-line and
    end-of-image; none for Janus). Structural tokens are forced, never sampled."""

    rows: int
    cols: int
    end_of_row: tuple[int, ...] = ()
    end: tuple[int, ...] = ()

    @property
    def num_codes(self) -> int:
        return self.rows * self.cols

    @cached_property
    def template(self) -> torch.Tensor:
        """(L,) block ids with -1 where codes go."""
        row = [-1] * self.cols + list(self.end_of_row)
        return torch.tensor(row * self.rows + list(self.end), dtype=torch.long)

    @cached_property
    def code_positions(self) -> torch.Tensor:
        return (self.template == -1).nonzero().squeeze(-1)

    def fill(self, block_codes: torch.Tensor) -> torch.Tensor:
        """(N, T) codes, already mapped to block ids -> (N, L) block."""
        block = self.template.to(block_codes.device).expand(block_codes.shape[0], -1).clone()
        block[:, self.code_positions.to(block_codes.device)] = block_codes
        return block


class ARStudent(ABC):
    """An AR image-token student: its family hooks are abstract, the rest is shared."""

    name: str
    source: ModelSource
    sampling: Sampling  # the reference model's sampling defaults
    lora_target_modules: str  # a regex over module names
    encoding: str  # names the image -> code mapping; part of the token-cache key
    codebook_l2_norm: bool  # the reference tokenizer matches L2-normalised latents and codes
    z_loss: float = 0.0  # weight of mean(logsumexp^2) in the loss, where the reference uses it
    separate_vq: bool = False  # the release holds no VQ tokenizer: `ModelSource.vq` must say where

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    resolution: int
    block: ImageBlock
    code_ids: torch.Tensor  # (C,) block-vocabulary id of each code
    pad_id: int  # left padding, always masked out
    revision: str | None = None  # the resolved commit of the loaded weights, where known
    loaded_source: ModelSource  # what `load` loaded, revision resolved (recorded in adapter cards)

    def __init__(self, name: str, source: ModelSource):
        self.name, self.source = name, source

    # -- family hooks -------------------------------------------------------------------

    @abstractmethod
    def _load(
        self, source: ModelSource, dtype: torch.dtype, layers: int | None, device: torch.device
    ) -> None:
        """Set `model`, `tokenizer`, `resolution`, `block`, `code_ids`, `pad_id`, `revision`;
        check the special tokens against the checkpoint's own configuration. `random:<config>`
        sources build the published architecture with random weights directly on `device`
        (`layers` cuts its depth)."""

    @abstractmethod
    def save(self, folder: str | Path) -> None:
        """Write the loaded model in its hub folder layout, which `load` reads back."""

    @abstractmethod
    def prompt_ids(self, prompt: str, unconditional: bool) -> list[int]:
        """Token ids of a prompt, ending right before the first image code."""

    @abstractmethod
    def embed_prompt(self, ids: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def embed_block(self, ids: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def transformer(self) -> torch.nn.Module:
        """The decoder stack: takes inputs_embeds, attention_mask, position_ids, cache."""

    @abstractmethod
    def head(self) -> torch.nn.Module:
        """The output head over the block vocabulary (the training targets)."""

    def block_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head()(hidden)

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the codes only (what sampling draws from)."""
        return self.block_logits(hidden)[..., self.code_ids]

    @abstractmethod
    def vq_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (N, 3, R, R) -> latents before quantisation (N, D, h, w)."""

    @abstractmethod
    def codebook(self) -> torch.Tensor:
        """The VQ codebook (C, D)."""

    @abstractmethod
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (N, T) -> pixels in [-1, 1] (N, 3, R, R)."""

    # -- shared -------------------------------------------------------------------------

    def load(
        self, device: torch.device, source: ModelSource | None = None, layers: int | None = None
    ) -> None:
        source = source or self.source
        self._load(source, training_dtype(device), layers, device)
        self.model.requires_grad_(False)
        self.model = self.model.to(device).eval()
        self.device = device
        self.code_ids = self.code_ids.to(device)
        self.loaded_source = ModelSource(source.id, self.revision, source.vq)

    def train_mode(self, gradient_checkpointing: bool) -> None:
        """Training: the decoder stack in train mode, with activation checkpointing if asked."""
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        self.transformer().train()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for bf16 weights; fp32 weights (a check, a CPU run) stay exact."""
        enabled = self.model.dtype == torch.bfloat16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def tokenize(self, prompts: Sequence[str], unconditional: Sequence[bool]) -> dict[str, torch.Tensor]:
        """Left-padded prompt ids and attention mask, ready to be followed by image codes.

        The width is rounded up to a multiple of `PAD_MULTIPLE`, so a prompt's padding (and the
        bf16 rounding that goes with it) rarely depends on its batch neighbours."""
        rows = [self.prompt_ids(p, u) for p, u in zip(prompts, unconditional, strict=True)]
        width = -(-max(map(len, rows)) // PAD_MULTIPLE) * PAD_MULTIPLE
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor, cache=None) -> torch.Tensor:
        """Hidden states of `embeds`, the last positions of the sequence `mask` covers."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1] :]
        out = self.transformer()(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def nll(self, inputs: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (plus z-loss) of the image block given the prompts."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        block = self.block.fill(self.code_ids[codes.to(self.device)])
        with self.autocast():
            embeds = torch.cat([self.embed_prompt(ids), self.embed_block(block[:, :-1])], dim=1)
            mask = torch.cat([mask, mask.new_ones(block.shape[0], block.shape[1] - 1)], dim=1)
            hidden = self._run(embeds, mask)[:, ids.shape[1] - 1 :]
            total = sum(
                self._chunk_loss(hidden[:, start : start + LOSS_CHUNK], block[:, start : start + LOSS_CHUNK])
                for start in range(0, block.shape[1], LOSS_CHUNK)
            )
        return total / block.numel()

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden.requires_grad:  # recompute logits in backward
            return checkpoint(self._summed_loss, hidden, targets, use_reentrant=False)
        return self._summed_loss(hidden, targets)

    def _summed_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.block_logits(hidden).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        if self.z_loss:
            loss = loss + self.z_loss * logits.logsumexp(-1).pow(2).sum()
        return loss

    @torch.no_grad()
    def sample_codes(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampling: Sampling | None = None,
        batch_size: int = 8,
    ) -> torch.Tensor:
        """Codes (N, T) of one image per (prompt, seed); image i depends only on those two."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        sampling = sampling or self.sampling
        chunks = [
            self._sample_batch(
                prompts[start : start + batch_size], seeds[start : start + batch_size], sampling
            )
            for start in range(0, len(prompts), batch_size)
        ]
        return torch.cat(chunks)

    def _branches(self, prompts: Sequence[str], sampling: Sampling) -> dict[str, torch.Tensor]:
        """Conditional rows, then (with guidance) the unconditional rows of the same images."""
        unconditional = [False] * len(prompts) + ([True] * len(prompts) if sampling.guided else [])
        return self.tokenize(list(prompts) * (2 if sampling.guided else 1), unconditional)

    def _sample_batch(self, prompts: Sequence[str], seeds: Sequence[int], sampling: Sampling) -> torch.Tensor:
        from transformers import StaticCache

        n, steps = len(prompts), self.block.num_codes
        inputs = self._branches(prompts, sampling)
        mask = inputs["attention_mask"]
        # one allocation for the whole image (a growing cache would copy itself every step)
        length = mask.shape[1] + self.block.template.numel()
        cache = StaticCache(config=self.transformer().config, max_cache_len=length)
        uniforms = seed_uniforms(seeds, steps, self.device)
        codes = torch.zeros((n, steps), dtype=torch.long, device=self.device)
        template = self.block.template.to(self.device)
        bounds = [*self.block.code_positions.tolist(), template.numel()]
        with self.autocast():
            hidden = self._run(self.embed_prompt(inputs["input_ids"]), mask, cache)[:, -1]
            for t in tqdm(
                range(steps), desc="image tokens", leave=False, mininterval=2.0, disable=steps < 1024
            ):
                logits = self.code_logits(hidden)
                probs = code_distribution(logits[:n], logits[n:] if sampling.guided else None, sampling)
                codes[:, t] = draw(probs, uniforms[:, t])
                if t + 1 == steps:
                    break
                step = template[bounds[t] : bounds[t + 1]].repeat(mask.shape[0], 1)
                step[:, 0] = self.code_ids[codes[:, t]].repeat(mask.shape[0] // n)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], step.shape[1])], dim=1)
                hidden = self._run(self.embed_block(step), mask, cache)[:, -1]
        return codes.cpu()

    @torch.no_grad()
    def reference_codes(self, prompt: str, seed: int, sampling: Sampling | None = None) -> torch.Tensor:
        """The textbook loop for one image: no cache, one full forward per branch and step.

        Same distribution and random numbers as `sample_codes`; what tests and
        `benchmarks/sampling.py` compare the fast loop with."""
        sampling = sampling or self.sampling
        steps = self.block.num_codes
        uniforms = seed_uniforms([seed], steps, self.device)
        branches = [
            torch.tensor([self.prompt_ids(prompt, u)], device=self.device)  # unpadded
            for u in ([False, True] if sampling.guided else [False])
        ]
        codes = torch.zeros((1, steps), dtype=torch.long, device=self.device)
        positions = self.block.code_positions.tolist()
        with self.autocast():
            for t in range(steps):
                block = self.block.fill(self.code_ids[codes])[:, : positions[t]]
                logits = []
                for ids in branches:
                    embeds = torch.cat([self.embed_prompt(ids), self.embed_block(block)], 1)
                    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
                    logits.append(self.code_logits(self._run(embeds, mask)[:, -1]))
                probs = code_distribution(logits[0], logits[1] if sampling.guided else None, sampling)
                codes[:, t] = draw(probs, uniforms[:, t])
        return codes.cpu()

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampling: Sampling | None = None,
        batch_size: int = 8,
    ) -> list[Image.Image]:
        """One image per (prompt, seed), sampled and decoded in batches of `batch_size`."""
        codes = self.sample_codes(prompts, seeds, sampling, batch_size)
        return [image for chunk in _chunks(codes, batch_size) for image in self.decode_images(chunk)]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (N, 3, R, R) -> codes (N, T): the nearest code, matched in fp32."""
        with self.autocast():
            latents = self.vq_latents(pixels.to(self.device))
        return nearest_codes(latents, self.codebook(), self.codebook_l2_norm)

    @torch.no_grad()
    def decode_images(self, codes: torch.Tensor) -> list[Image.Image]:
        with self.autocast():
            return to_pil(self.decode_codes(codes.to(self.device)))


def nearest_codes(latents: torch.Tensor, codebook: torch.Tensor, l2_normalized: bool) -> torch.Tensor:
    """Index of the nearest codebook row for every latent vector, in fp32.

    latents (N, D, h, w), codebook (C, D) -> (N, h*w). With `l2_normalized`, latents and
    codebook rows are unit-normalised first (a `codebook_l2_norm` tokenizer such as Janus'):
    transformers' quantizer skips that, and bf16 distances flip near-ties."""
    z = latents.float().permute(0, 2, 3, 1).flatten(1, 2)
    e = codebook.float()
    if l2_normalized:
        z, e = F.normalize(z, dim=-1), F.normalize(e, dim=-1)
    distances = z.pow(2).sum(-1, keepdim=True) - 2 * z @ e.T + e.pow(2).sum(-1)
    return distances.argmin(-1)


def _chunks(items: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, items.shape[0], size):
        yield items[start : start + size]
