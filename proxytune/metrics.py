"""DreamBench subject-fidelity metrics on L2-normalised features.

Convention (stated in every report): raw cosine similarities, averaged over all
(generated, reference) pairs for CLIP-I and DINO; CLIP-T pairs each generated image with
its own prompt, the identifier removed ("a dog in the jungle").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PROTOCOL = (
    "raw cosine similarity; CLIP-I and DINO averaged over all (generated, reference) pairs; "
    "CLIP-T between each image and its prompt with the identifier removed"
)


def mean_pairwise_cosine(generated: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine over all pairs: CLIP-I with CLIP features, DINO with DINO features."""
    return (F.normalize(generated.float(), dim=-1) @ F.normalize(references.float(), dim=-1).T).mean().item()


def mean_paired_cosine(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine of row i with row i: CLIP-T."""
    if images.shape != texts.shape:
        raise ValueError(f"need one text per image, got {tuple(images.shape)} and {tuple(texts.shape)}")
    return (F.normalize(images.float(), dim=-1) * F.normalize(texts.float(), dim=-1)).sum(-1).mean().item()
