import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from proxytune.analysis.variance import Spread, centroid_distances, histograms, plot_variance, total_variance

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RED, BLUE = (214, 39, 40), (31, 119, 180)  # matplotlib's tab:red (supervisor), tab:blue (student)


def test_total_variance_is_the_trace_of_the_unbiased_covariance():
    rng = np.random.default_rng(0)
    scales = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 0.1])
    x = rng.normal(size=(20_000, len(scales))) * scales + 7.0  # diagonal covariance, offset mean
    assert total_variance(x) == pytest.approx((scales**2).sum(), rel=0.03)
    assert total_variance(x) == pytest.approx(np.trace(np.cov(x, rowvar=False)), rel=1e-9, abs=1e-9)

    small = rng.normal(size=(5, 300))  # few samples, many dimensions (the evaluation's shape)
    assert total_variance(small) == pytest.approx(np.trace(np.cov(small, rowvar=False)), rel=1e-9)


def test_total_variance_accepts_float32_tensors_and_computes_in_float64():
    features = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)) * 1e3 + 1e4
    exact = np.trace(np.cov(features.numpy().astype(np.float64), rowvar=False))
    assert total_variance(features) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError, match=r"at least 2 feature rows \(N, D\), got shape \(1, 16\)"):
        total_variance(features[:1])


def test_distances_are_to_the_mean_of_the_references():
    rng = np.random.default_rng(2)
    features, references = rng.normal(size=(7, 5)), rng.normal(size=(4, 5)) + 1.0
    centroid = [sum(r[d] for r in references) / len(references) for d in range(5)]
    expected = [math.dist(row, centroid) for row in features]
    np.testing.assert_allclose(centroid_distances(features, references), expected, rtol=1e-12)

    spread = Spread.of(features, references)
    assert spread.summary() == pytest.approx(
        {
            "total_variance": np.trace(np.cov(features, rowvar=False)),
            "mean_distance": np.mean(expected),
            "median_distance": np.median(expected),
        },
        rel=1e-12,
    )


def test_histograms_share_bins_that_cover_every_distance():
    rng = np.random.default_rng(3)
    distances = {"supervisor": rng.gamma(2.0, 0.3, size=50), "student": rng.gamma(4.0, 0.1, size=30)}
    edges, counts = histograms(distances, bins=10)
    assert len(edges) == 11
    every = np.concatenate(list(distances.values()))
    assert edges[0] == every.min() and edges[-1] == every.max()
    for model, values in distances.items():
        inner = [sum(lo <= v < hi for v in values) for lo, hi in itertools.pairwise(edges[:-1])]
        last = sum(edges[-2] <= v <= edges[-1] for v in values)  # the last bin includes its right edge
        assert counts[model].tolist() == [*inner, last]


def spread(rng: np.random.Generator, scale: float) -> Spread:
    return Spread.of(rng.normal(scale=scale, size=(12, 8)), rng.normal(size=(3, 8)))


def test_plot_is_a_png_of_one_row_per_subject_in_the_models_colours(tmp_path):
    rng = np.random.default_rng(4)
    plot_variance(
        tmp_path / "one.png", {"dog": {"student": spread(rng, 0.5), "supervisor": spread(rng, 1.0)}}
    )
    plot_variance(
        tmp_path / "two.png",
        {
            "dog": {"student": spread(rng, 0.5), "supervisor": spread(rng, 1.0)},
            "cat": {"student": spread(rng, 0.5)},  # a black-box supervisor: the student alone
        },
    )
    assert (tmp_path / "one.png").read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "two.png") as two:
        assert (one.format, one.size, two.size) == (
            "PNG",
            (900, 288),
            (900, 576),
        )  # 10 x 3.2 in a row, 90 dpi
        colours = {c for _, c in one.convert("RGB").getcolors(one.width * one.height)}
        assert {RED, BLUE} <= colours
        cat = two.convert("RGB").crop((0, 288, 900, 576))
        assert RED not in {c for _, c in cat.getcolors(cat.width * cat.height)}
