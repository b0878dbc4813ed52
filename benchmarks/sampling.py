"""Ratio benchmark: the students' sampling loop vs the textbook loop, in one process.

The fast loop (`ARStudent.sample_codes`) prefills each prompt once into a KV cache, runs the
conditional and unconditional branches of every image as rows of one batch and feeds one
new token per step. The naive loop (`ARStudent.reference_codes`) has no cache and runs two
full forward passes per step (conditional, then unconditional), one image at a time. Both
draw the same codes from the same seeds, which the benchmark checks before timing counts.

    .venv/bin/python benchmarks/sampling.py [--student tiny-lumina] [--images 8]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from proxytune.core.registry import STUDENTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="tiny-lumina", help="a backend with 256 or more image tokens")
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    backend = STUDENTS.create(args.student)
    backend.load(torch.device("cpu"))  # fp32: both loops draw exactly the same codes
    prompts = [f"a sks dog, view {i}" for i in range(args.images)]
    seeds = list(range(args.images))
    backend.sample_codes(prompts[:1], seeds[:1])  # warm-up

    start = time.perf_counter()
    fast = backend.sample_codes(prompts, seeds, batch_size=args.images)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = torch.cat([backend.reference_codes(p, s) for p, s in zip(prompts, seeds, strict=True)])
    naive_s = time.perf_counter() - start

    same = (fast == naive).float().mean().item()
    print(f"student {backend.name}: {backend.block.num_codes} image tokens, {args.images} images")
    print(f"sampling: {backend.sampling}")
    print(f"naive loop (no cache, 2 passes per step, 1 image at a time) {naive_s:8.2f} s")
    print(f"fast loop (KV cache, batched CFG, {args.images} images per batch)  {fast_s:8.2f} s")
    print(f"codes equal between the loops: {same:.1%}")
    if same < 0.99:
        raise SystemExit("the loops disagree: the speed-up would compare different computations")
    print(f"speed-up: {naive_s / fast_s:.2f}x")


if __name__ == "__main__":
    main()
