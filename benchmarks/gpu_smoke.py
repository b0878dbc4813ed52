"""GPU smoke and throughput test of the real students, at full size with random weights.

Builds Janus-Pro-1B, Janus-Pro-7B and Lumina-mGPT-7B-768 from their published
configurations (`proxytune/backends/configs/`) directly on the GPU in bf16, then, per model:

- LoRA training at the `paper` preset (rank, batch and micro-batch; gradient checkpointing):
  tokens/s, model FLOPs utilisation and peak memory;
- sampling a batch of 16 images with classifier-free guidance through the students' shared
  loop (KV cache, both branches in one batch), then decoding them: image tokens/s and s/image.

Then each real supervisor (SDXL, FLUX.1-dev, SD3.5 Large, SD3 Medium, SD 1.5) at full size:
one LoRA step at its recipe's batch and native size (time, peak memory) and one image at
native resolution with its reference steps and guidance.

MFU counts 4 N FLOPs per trained token, N the parameters of the decoder layers and the head
used at every position: 2 N forward, 2 N for the gradients to the activations (the frozen
weights get none; LoRA, attention scores and recomputation are not counted), against
`--peak-tflops` (H200 bf16 dense: 989). Without a GPU it prints why and exits 0;
`--device cpu --models tiny-janus,tiny-lumina` runs the same code on tiny models (CI does).

    python benchmarks/gpu_smoke.py [--models janus-pro-1b,janus-pro-7b,lumina-mgpt-7b-768] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from proxytune.backends._base import ModelSource
from proxytune.core.config import PRESETS
from proxytune.core.registry import STUDENTS

REAL = "lumina-mgpt-7b-768,janus-pro-7b,janus-pro-1b"  # the paper's student first, if time runs out
SUPERVISORS_REAL = "sdxl,flux-dev,sd3.5-large,sd3,sd15"  # the paper's default supervisor first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=REAL)
    parser.add_argument("--supervisors", default=SUPERVISORS_REAL)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--images", type=int, default=16, help="images sampled in one batch")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the models left after this")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU here; skipping (use --device cpu with tiny models to dry-run)")
        return 0
    started, rows = time.perf_counter(), []
    for name in ("tiny-janus", "tiny-lumina"):
        print(json.dumps(consistency(name, device)), flush=True)
    supervisor_rows = []
    for measure_one, names, out in (
        (measure, args.models, rows),
        (measure_supervisor, args.supervisors, supervisor_rows),
    ):
        for name in filter(None, names.split(",")):
            if time.perf_counter() - started > args.budget_s:
                print(f"gpu_smoke: over the {args.budget_s:.0f} s budget, skipping {name}")
                continue
            out.append(measure_one(name, device, args))
            print(json.dumps(out[-1]), flush=True)
            release(device)
    print_table(rows, device, args)
    print_supervisor_table(supervisor_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": describe(device), "students": rows, "supervisors": supervisor_rows}, f, indent=2
            )
    return 0


def measure_supervisor(name: str, device: torch.device, args) -> dict:
    """One LoRA step at the backend's recipe batch and native size (bf16 on GPU, gradient
    checkpointing), then one image at native resolution with the reference steps and guidance."""
    from proxytune.backends._diffusion import repeat
    from proxytune.core.registry import SUPERVISORS

    start = time.perf_counter()
    backend = SUPERVISORS.create(name)
    backend.load(device, ModelSource(f"random:{name}"))
    built_s = time.perf_counter() - start
    params = sum(p.numel() for p in backend.denoiser.parameters())
    vae = backend.pipe.vae
    side = backend.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    batch = backend.recipe.batch_size
    latents = torch.randn(batch, vae.config.latent_channels, side, side, device=device)
    cond = repeat(backend.encode_prompts(["a sks dog"]), batch)
    lora = backend.add_lora(backend.recipe.rank, float(backend.recipe.rank))
    optimizer = torch.optim.AdamW(lora, lr=backend.recipe.learning_rate)

    def step(optimizer: torch.optim.Optimizer) -> None:
        backend.training_loss(latents, cond, torch.Generator().manual_seed(0)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(optimizer)
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    step(optimizer)
    synchronize(device)
    train_s = time.perf_counter() - start
    train_peak = peak_gib(device)
    del optimizer, lora
    release(device)
    reset_peak(device)
    start = time.perf_counter()
    (image,) = backend.generate(
        ["a sks dog on the beach"], [0], backend.inference_steps, backend.guidance_scale
    )
    synchronize(device)
    return {
        "supervisor": name,
        "denoiser_parameters": params,
        "build_s": round(built_s, 1),
        "train_step_s": round(train_s, 3),
        "train_batch": batch,
        "train_peak_gib": train_peak,
        "s_per_image": round(time.perf_counter() - start, 2),
        "image_size": image.size[0],
        "sampling": f"{backend.inference_steps} steps, guidance {backend.guidance_scale}",
        "sample_peak_gib": peak_gib(device),
    }


def measure(name: str, device: torch.device, args) -> dict:
    from peft import LoraConfig, get_peft_model

    paper = PRESETS["paper"]["student"]
    start = time.perf_counter()
    backend = STUDENTS.create(name)
    backend.load(device, ModelSource(f"random:{name}"))
    built_s = time.perf_counter() - start
    params = sum(p.numel() for p in backend.model.parameters())
    per_token = per_token_parameters(backend)
    peft_model = get_peft_model(
        backend.model,
        LoraConfig(r=paper["rank"], lora_alpha=paper["rank"], target_modules=backend.lora_target_modules),
    )
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    lora_parameters = sum(p.numel() for p in lora)
    for p in lora:
        p.data = p.data.float()
    backend.train_mode(gradient_checkpointing=device.type == "cuda")
    batch, micro = paper["batch_size"], paper["micro_batch_size"]
    codes = torch.randint(0, backend.code_ids.numel(), (batch, backend.block.num_codes))
    prompts = [f"a sks dog, photo {i}" for i in range(batch)]

    def train_step(optimizer: torch.optim.Optimizer) -> int:
        tokens = 0
        for first in range(0, batch, micro):
            inputs = backend.tokenize(
                prompts[first : first + micro], [False] * len(prompts[first : first + micro])
            )
            (backend.nll(inputs, codes[first : first + micro]) * micro / batch).backward()
            images = codes[first : first + micro].shape[0]  # prompt tokens + the block fed (L - 1)
            tokens += int(inputs["attention_mask"].sum()) + images * (backend.block.template.numel() - 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    optimizer = torch.optim.AdamW(lora, lr=1e-4)
    train_step(optimizer)
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    tokens = sum(train_step(optimizer) for _ in range(args.steps))
    synchronize(device)
    train_s = time.perf_counter() - start
    train_peak = peak_gib(device)
    flops = 4 * per_token * tokens / train_s

    backend.model = peft_model.unload().eval()
    del optimizer, lora
    release(device)
    reset_peak(device)
    sample_prompts = [f"a sks dog in scene {i}" for i in range(args.images)]
    synchronize(device)
    start = time.perf_counter()
    sampled = backend.sample_codes(sample_prompts, list(range(args.images)), batch_size=args.images)
    synchronize(device)
    sample_s = time.perf_counter() - start
    start = time.perf_counter()
    images = backend.decode_images(sampled)
    synchronize(device)
    decode_s = time.perf_counter() - start
    return {
        "model": name,
        "parameters": params,
        "lora_parameters": lora_parameters,
        "build_s": round(built_s, 1),
        "train_tokens_per_s": round(tokens / train_s),
        "mfu": round(flops / (args.peak_tflops * 1e12), 4),
        "train_peak_gib": train_peak,
        "batch": f"{batch} x {backend.block.template.numel()} tokens (micro-batch {micro})",
        "sample_tokens_per_s": round(args.images * backend.block.num_codes / sample_s, 1),
        "s_per_image": round((sample_s + decode_s) / args.images, 3),
        "sample_peak_gib": peak_gib(device),
        "image_size": images[0].size[0],
        "sampling": str(backend.sampling),
    }


def consistency(name: str, device: torch.device) -> dict:
    """On the GPU, in fp32: the fast loop draws what the textbook loop draws, and left padding
    (fully masked query rows, which some attention kernels turn into NaN) changes no loss."""
    backend = STUDENTS.create(name)
    backend.load(device)
    backend.model.float()  # fp32 weights: no autocast, exact comparisons
    prompts, seeds = ["a sks dog", "a sks dog on a long and winding road"], [3, 4]
    fast = backend.sample_codes(prompts, seeds)
    reference = torch.cat([backend.reference_codes(p, s) for p, s in zip(prompts, seeds, strict=True)])
    codes = torch.randint(0, backend.code_ids.numel(), (2, backend.block.num_codes))
    with torch.no_grad():
        batched = backend.nll(backend.tokenize(prompts, [False, True]), codes)
        alone = [
            backend.nll(backend.tokenize([p], [u]), codes[i : i + 1])
            for i, (p, u) in enumerate(zip(prompts, [False, True], strict=True))
        ]
    return {
        "check": f"{name} on {device.type} in fp32",
        "fast_equals_reference": round((fast == reference).float().mean().item(), 4),
        "padded_loss_error": float((batched - sum(alone) / 2).abs()),
        "finite": bool(torch.isfinite(batched)),
    }


def per_token_parameters(backend) -> int:
    """Parameters of the decoder layers and of the head every position goes through."""
    layers = sum(p.numel() for n, p in backend.transformer().named_parameters() if n.startswith("layers."))
    return layers + sum(p.numel() for p in backend.head().parameters())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU (torch {torch.__version__})"


def print_table(rows: list[dict], device: torch.device, args) -> None:
    print(f"\n{describe(device)}; paper preset student LoRA; sampling {args.images} images with CFG\n")
    columns = ["model", "params", "LoRA params", "train tokens/s", "MFU", "train peak GiB"]
    columns += ["sample tokens/s", "s/image", "sample peak GiB"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print(
            f"| {r['model']} | {r['parameters'] / 1e9:.2f}B | {r['lora_parameters'] / 1e6:.1f}M | "
            f"{r['train_tokens_per_s']:,} | {r['mfu']:.1%} | {r['train_peak_gib']} | "
            f"{r['sample_tokens_per_s']:,} | {r['s_per_image']} | {r['sample_peak_gib']} |"
        )


def print_supervisor_table(rows: list[dict]) -> None:
    columns = [
        "supervisor",
        "denoiser params",
        "train step s (batch)",
        "train peak GiB",
        "s/image",
        "sampling",
    ]
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print(
            f"| {r['supervisor']} | {r['denoiser_parameters'] / 1e9:.2f}B | "
            f"{r['train_step_s']} ({r['train_batch']}) | {r['train_peak_gib']} | "
            f"{r['s_per_image']} ({r['image_size']} px) | {r['sampling']} |"
        )


if __name__ == "__main__":
    sys.exit(main())
