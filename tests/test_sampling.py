"""The per-step distribution and the draw, against transformers' own logits processors."""

import pytest
import torch
from transformers import (
    ClassifierFreeGuidanceLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from proxytune.core.params import Sampling
from proxytune.core.sampling import code_distribution, draw, seed_uniforms


def reference_probs(cond, uncond, sampling: Sampling) -> torch.Tensor:
    """transformers' processors, in its order: CFG, temperature, top-k, top-p."""
    ids = torch.zeros((cond.shape[0], 1), dtype=torch.long)
    scores = ClassifierFreeGuidanceLogitsProcessor(sampling.guidance_scale)(ids, torch.cat([cond, uncond]))
    scores = TemperatureLogitsWarper(sampling.temperature)(ids, scores)
    if sampling.top_k:
        scores = TopKLogitsWarper(sampling.top_k)(ids, scores)
    if sampling.top_p < 1:
        scores = TopPLogitsWarper(sampling.top_p)(ids, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize(
    "sampling",
    [
        Sampling(guidance_scale=5.0, temperature=1.0, top_k=0, top_p=1.0),
        Sampling(guidance_scale=4.0, temperature=1.0, top_k=20, top_p=1.0),
        Sampling(guidance_scale=3.0, temperature=0.7, top_k=0, top_p=0.8),
        Sampling(guidance_scale=7.5, temperature=1.3, top_k=40, top_p=0.9),
    ],
)
def test_distribution_matches_transformers_processors(sampling):
    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 300, generator=generator), torch.randn(3, 300, generator=generator)
    ours = code_distribution(cond, uncond, sampling)
    assert torch.allclose(ours, reference_probs(cond, uncond, sampling), atol=1e-6)
    assert torch.allclose(ours.sum(-1), torch.ones(3))


def test_top_k_zero_keeps_every_code():
    logits = torch.randn(2, 16384)
    probs = code_distribution(logits, None, Sampling(guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0))
    assert (probs > 0).all()
    assert torch.allclose(probs, logits.softmax(-1))


def test_guidance_one_is_the_conditional_distribution():
    cond, uncond = torch.randn(2, 50), torch.randn(2, 50)
    unguided = Sampling(guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0)
    assert not unguided.guided
    assert torch.allclose(code_distribution(cond, uncond, unguided), cond.softmax(-1))


def test_draws_follow_the_distribution_and_never_pick_excluded_codes():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]).expand(40_000, -1)
    uniforms = seed_uniforms([0], 40_000, torch.device("cpu"))[0]
    codes = draw(probs, uniforms)
    counts = torch.bincount(codes, minlength=5) / 40_000
    assert counts[1] == counts[4] == 0
    assert torch.allclose(counts, probs[0], atol=0.01)
    edge = draw(torch.tensor([[0.25, 0.75, 0.0]]), torch.tensor([1.0 - 1e-17], dtype=torch.float64))
    assert edge.item() == 1


def test_each_row_of_uniforms_comes_from_its_own_seed():
    both = seed_uniforms([3, 9], 10, torch.device("cpu"))
    assert torch.equal(both[1], seed_uniforms([9], 10, torch.device("cpu"))[0])
    assert not torch.equal(both[0], both[1])


def test_overrides_replace_only_what_is_set_and_are_validated():
    janus = Sampling(guidance_scale=5.0, temperature=1.0, top_k=0, top_p=1.0)
    assert janus.override(guidance_scale=None, top_k=2000) == janus.model_copy(update={"top_k": 2000})
    with pytest.raises(ValueError, match="guidance_scale"):
        janus.override(guidance_scale=0.5)
