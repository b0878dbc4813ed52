"""Ratio benchmark: student training from the token cache vs re-encoding images each step.

Both variants run the same LoRA steps on the same proxy images in one process; the ratio
(not the absolute seconds, which depend on the machine) is the figure to quote.

    .venv/bin/python benchmarks/token_cache.py [--images 32] [--steps 30] [--student tiny-janus]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image

from proxytune.core.contracts import ProxyRecord
from proxytune.core.images import to_tensor
from proxytune.core.registry import STUDENTS
from proxytune.stages.student import token_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--student", default="tiny-janus")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = STUDENTS.create(args.student)
    backend.load(device)
    folder = Path(tempfile.mkdtemp())
    generator = torch.Generator().manual_seed(0)
    records = []
    for i in range(args.images):
        pixels = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        records.append(ProxyRecord(file=f"{i}.png", prompt="a sks dog", seed=i, supervisor="bench"))
    prompts = [r.prompt for r in records]
    from peft import LoraConfig, get_peft_model

    get_peft_model(backend.model, LoraConfig(r=8, target_modules=backend.lora_target_modules))

    def reencoded(index: list[int]) -> torch.Tensor:
        images = [Image.open(folder / records[i].file).convert("RGB") for i in index]
        return backend.encode_images(to_tensor(images, backend.resolution))

    def cached() -> Callable[[list[int]], torch.Tensor]:
        codes = token_cache(backend, folder, "bench", records, None)
        return lambda index: codes[index]

    def run(codes_for) -> None:
        for _ in range(args.steps):
            index = torch.randint(0, len(records), (args.batch,), generator=generator).tolist()
            inputs = backend.tokenize([prompts[i] for i in index], [False] * len(index))
            backend.nll(inputs, codes_for(index)).backward()

    run(reencoded)  # warm-up
    timings = {}
    start = time.perf_counter()
    run(reencoded)
    timings["re-encode every step"] = time.perf_counter() - start
    start = time.perf_counter()
    run(cached())
    timings["token cache"] = time.perf_counter() - start
    for name, seconds in timings.items():
        print(f"{name:24s} {seconds:8.3f} s for {args.steps} steps (incl. encoding)")
    print(f"speed-up: {timings['re-encode every step'] / timings['token cache']:.2f}x")


if __name__ == "__main__":
    main()
