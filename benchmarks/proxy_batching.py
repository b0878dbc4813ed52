"""Ratio benchmark: proxy images drawn in batches vs one at a time, on a tiny supervisor.

Both draw the same images (image i from seed i) in one process; the ratio is the figure.

    .venv/bin/python benchmarks/proxy_batching.py [--supervisor tiny-flux] [--images 16] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from proxytune.core.registry import SUPERVISORS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supervisor", default="tiny-flux")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    backend = SUPERVISORS.create(args.supervisor)
    backend.load(torch.device("cpu"))
    prompt, guidance = "a sks dog", backend.guidance_scale
    backend.generate([prompt], [0], args.steps, guidance)  # warm-up

    start = time.perf_counter()
    alone = [backend.generate([prompt], [i], args.steps, guidance)[0] for i in range(args.images)]
    alone_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = []
    for first in range(0, args.images, args.batch):
        seeds = list(range(first, min(first + args.batch, args.images)))
        batched += backend.generate([prompt] * len(seeds), seeds, args.steps, guidance)
    batched_s = time.perf_counter() - start

    gap = max(
        int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
        for a, b in zip(alone, batched, strict=True)
    )
    print(f"supervisor {backend.name}: {args.images} images, {args.steps} steps, CFG {guidance}")
    print(f"one image at a time       {alone_s:8.2f} s")
    print(f"batches of {args.batch:<3d}            {batched_s:8.2f} s")
    print(f"largest pixel difference between the two: {gap} (batched kernels round differently)")
    print(f"speed-up: {alone_s / batched_s:.2f}x")


if __name__ == "__main__":
    main()
