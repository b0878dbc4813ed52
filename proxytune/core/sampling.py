"""How AR students draw image codes: sampling parameters and the per-step distribution.

Every student samples through one loop (`proxytune.backends._ar.ARStudent.sample_codes`);
this module holds what that loop and its slow reference share:

- `Sampling` (in `proxytune.core.params`, which needs no torch): guidance scale, temperature,
  top-k and top-p, always explicit. Each backend declares its reference model's values
  (Janus-Pro: all 16384 codes at temperature 1, CFG 5; Lumina-mGPT: image top-k 2000, CFG 4),
  so nothing falls back to a library default such as transformers' `top_k=50`.
- `code_distribution`: classifier-free guidance, then temperature, top-k, top-p (in that
  order, as transformers' logits processors apply them), as probabilities.
- `draw` with `seed_uniforms`: inverse-CDF sampling from one uniform per code and image,
  drawn up front from the image's own generator, so image i depends only on its prompt and
  seed, whatever else is in the batch (exactly in fp32; in bf16 up to kernel rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proxytune.core.params import Sampling


def code_distribution(cond: torch.Tensor, uncond: torch.Tensor | None, sampling: Sampling) -> torch.Tensor:
    """Probabilities (N, C) over codes from conditional (and unconditional) logits."""
    logits = cond.float()
    if uncond is not None:
        logits = uncond.float() + sampling.guidance_scale * (logits - uncond.float())
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs > sampling.top_p  # the most likely code always stays
        logits = logits.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
    return logits.softmax(-1)


def seed_uniforms(seeds: Sequence[int], steps: int, device: torch.device) -> torch.Tensor:
    """(N, steps) uniforms in [0, 1), row i from a CPU generator seeded with `seeds[i]`."""
    rows = [
        torch.rand(steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for seed in seeds
    ]
    return torch.stack(rows).to(device)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample (N,) from probabilities (N, C) with one uniform per row.

    Only codes of non-zero probability can come out (the search is strict and capped at the
    last such code, for the rare uniform that rounds onto the total)."""
    cdf = probs.double().cumsum(-1)
    target = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(index, last)
