"""Feature-variance analysis after the paper's supplementary (Fig. 1): a proxy-tuned student's
samples should sit more tightly around the subject than its supervisor's (mode seeking cuts
the supervisor's long tail of artifacts).

Two numbers per model and subject: the total variance of its samples' features (trace of
their covariance: how spread out they are) and each sample's L2 distance to the subject
centroid, the mean of the subject photos' features (how far from the subject they stray).
The evaluation uses the DINO metric's L2-normalised features, so distances lie in [0, 2] and a
total variance is at most 1; the paper does not state its feature scale (its totals, in the
hundreds, suggest unnormalised features), so compare models within a run, not with its numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

BINS = 20
WIDTH, ROW_HEIGHT, DPI = 10.0, 3.2, 90  # inches, inches, dots per inch: 900 x 288 px per subject
COLOURS = {"supervisor": "tab:red", "student": "tab:blue", "direct": "tab:green", "base": "tab:gray"}


def total_variance(features: ArrayLike) -> float:
    """Trace of the unbiased (ddof=1) covariance of the rows, in float64: the sum of the
    per-dimension variances, without building the D x D matrix."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 feature rows (N, D), got shape {x.shape}")
    return float(x.var(axis=0, ddof=1).sum())


def centroid_distances(features: ArrayLike, references: ArrayLike) -> np.ndarray:
    """Each row's L2 distance to the centroid (mean) of the reference features: the subject's
    photos, so the distance measures drift from the subject rather than from the model's own
    mean (which `total_variance` already covers)."""
    x = np.asarray(features, dtype=np.float64)
    centroid = np.asarray(references, dtype=np.float64).mean(axis=0)
    return np.linalg.norm(x - centroid, axis=1)


def histograms(
    distances: Mapping[str, np.ndarray], bins: int = BINS
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Counts of each model's distances over one set of bin edges spanning all of them, so the
    overlaid histograms compare bin for bin."""
    edges = np.histogram_bin_edges(np.concatenate(list(distances.values())), bins=bins)
    return edges, {model: np.histogram(d, bins=edges)[0] for model, d in distances.items()}


@dataclass(frozen=True)
class Spread:
    """One model's samples of one subject: total variance and distances to the subject centroid."""

    total_variance: float
    distances: np.ndarray

    @classmethod
    def of(cls, features: ArrayLike, references: ArrayLike) -> Spread:
        return cls(total_variance(features), centroid_distances(features, references))

    def summary(self) -> dict[str, float]:
        return {
            "total_variance": self.total_variance,
            "mean_distance": float(np.mean(self.distances)),
            "median_distance": float(np.median(self.distances)),
        }


def plot_variance(path: str | Path, spreads: Mapping[str, Mapping[str, Spread]]) -> None:
    """A PNG with one row per subject (`spreads[subject][model]`): total variance per model
    (bars) and the models' distance histograms overlaid on shared bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(spreads), 2, figsize=(WIDTH, ROW_HEIGHT * len(spreads)), dpi=DPI, squeeze=False
    )
    for (bars, hist), (subject, models) in zip(axes, spreads.items(), strict=True):
        colours = [COLOURS.get(model, "tab:gray") for model in models]
        values = [spread.total_variance for spread in models.values()]
        drawn = bars.bar(list(models), values, color=colours)
        bars.bar_label(drawn, fmt="%.4f")
        bars.margins(y=0.15)  # room for the labels under the title
        bars.set_ylabel("trace of covariance")
        bars.set_title(f"{subject}: total variance of DINO features")
        edges, counts = histograms({model: spread.distances for model, spread in models.items()})
        for (model, count), colour in zip(counts.items(), colours, strict=True):
            hist.stairs(count, edges, fill=True, alpha=0.45, color=colour, label=model)
        hist.set_xlabel("L2 distance to the subject centroid")
        hist.set_ylabel("samples")
        hist.set_title(f"{subject}: distances to the subject")
        hist.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=DPI)
    plt.close(figure)
