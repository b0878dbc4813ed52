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


def gains(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """The student's gain over every other method scored, per score, absolute and relative:
    `gains[method][score] = {"gain": student - method, "relative_gain": gain / |method|}`."""
    student = metrics["student"]
    return {
        method: {
            k: {"gain": student[k] - v, "relative_gain": (student[k] - v) / abs(v)} for k, v in scores.items()
        }
        for method, scores in metrics.items()
        if method != "student"
    }


def flat_gains(gains: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """`gain_vs_supervisor_dino`, `relative_gain_vs_direct_clip_i`, ...: for MLflow and KFP Metrics."""
    return {
        f"{kind}_vs_{method}_{score}": value
        for method, scores in gains.items()
        for score, values in scores.items()
        for kind, value in values.items()
    }
