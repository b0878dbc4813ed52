"""Ratio benchmark: evaluation scoring with batched encoders and reference features computed
once (what `proxytune.stages.evaluate` does) vs a per-image loop that embeds each sample alone and
the subject's photos again for every sample. Both compute the same scores in one process.

    .venv/bin/python benchmarks/evaluation.py [--images 32] [--photos 4]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image, ImageOps

from proxytune.analysis.metrics import mean_paired_cosine, mean_pairwise_cosine
from proxytune.core.params import EvalParams
from proxytune.stages.eval_score import Encoders, Features, References

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "subjects" / "dog"


def per_image(encoders: Encoders, photos, images, texts) -> dict[str, float]:
    """The loop a first implementation writes: one sample at a time, references each time."""
    totals = {"clip_i": 0.0, "clip_t": 0.0, "dino": 0.0}
    for image, text in zip(images, texts, strict=True):
        clip, dino = encoders.clip.embed_images([image]), encoders.dino.embed_images([image])
        totals["clip_i"] += mean_pairwise_cosine(clip, encoders.clip.embed_images(photos))
        totals["dino"] += mean_pairwise_cosine(dino, encoders.dino.embed_images(photos))
        totals["clip_t"] += mean_paired_cosine(clip, encoders.clip.embed_texts([text]))
    return {k: v / len(images) for k, v in totals.items()}


def batched(encoders: Encoders, photos, images, texts) -> dict[str, float]:
    return Features.of(encoders, images, texts).scores(References.of(encoders, photos))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="generated samples to score")
    parser.add_argument("--photos", type=int, default=4, help="reference photos of the subject")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    params = EvalParams()
    encoders = Encoders.load(params, torch.device("cpu"))
    sources = sorted(EXAMPLE.glob("*.jpg"))
    photos = [Image.open(p).convert("RGB") for p in sources[: args.photos]]
    images = [ImageOps.mirror(photos[i % len(photos)]).rotate(7 * i) for i in range(args.images)]
    texts = [f"a dog number {i}" for i in range(args.images)]
    batched(encoders, photos, images[:2], texts[:2])  # warm-up

    start = time.perf_counter()
    slow = per_image(encoders, photos, images, texts)
    slow_s = time.perf_counter() - start
    start = time.perf_counter()
    fast = batched(encoders, photos, images, texts)
    fast_s = time.perf_counter() - start

    gap = max(abs(slow[k] - fast[k]) for k in fast)
    encoders_used = f"{params.clip_encoder}, {params.dino_encoder}"
    print(f"encoders {encoders_used}: {args.images} samples, {args.photos} photos")
    print(f"per-image loop            {slow_s:8.3f} s")
    print(f"batched, references once  {fast_s:8.3f} s")
    print(f"largest score difference between the two: {gap:.2e}")
    if gap > 1e-4:
        raise SystemExit("the two ways disagree: the benchmark compares different computations")
    print(f"speed-up: {slow_s / fast_s:.2f}x")


if __name__ == "__main__":
    main()
