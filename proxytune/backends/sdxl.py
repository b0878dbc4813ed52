"""Stable Diffusion XL supervisors (UNet, epsilon): `tiny-sdxl`, `sdxl`.

Conditioning as SDXL was trained: the penultimate hidden states of both CLIP text encoders,
concatenated (768 + 1280), the second encoder's pooled projection, and the size/crop
micro-conditioning (original size, crop corner, target size); the photos are center-cropped
and resized to the training size, so that is (R, R, 0, 0, R, R).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proxytune.backends._base import ModelSource
from proxytune.backends._checkpoints import published_config
from proxytune.backends._diffusion import Conditioning, DiffusionSupervisor, Recipe
from proxytune.core.registry import SUPERVISORS


class SDXLSupervisor(DiffusionSupervisor):
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser_name = "unet"
    training_scheduler_class = "DDPMScheduler"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts), device=self.device, do_classifier_free_guidance=False
        )
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=self.device)
        return {
            "encoder_hidden_states": embeds,
            "text_embeds": pooled,
            "time_ids": time_ids.expand(len(prompts), -1),
        }

    def training_loss(
        self, latents: torch.Tensor, cond: Conditioning, generator: torch.Generator
    ) -> torch.Tensor:
        def predict(noisy: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
            return self.pipe.unet(noisy, steps, cond["encoder_hidden_states"], added_cond_kwargs=added).sample

        return self.ddpm_loss(latents, generator, predict)


SUPERVISORS.register(
    "tiny-sdxl",
    lambda: SDXLSupervisor(
        "tiny-sdxl",
        ModelSource("random:tiny-sdxl"),
        64,
        10,
        5.0,
        Recipe(steps=40, learning_rate=1e-3, rank=4, batch_size=1),
    ),
    "random-weight SDXL (64 px, two text encoders) for tests and the CPU demo",
)
SUPERVISORS.register(
    "sdxl",
    lambda: SDXLSupervisor(
        "sdxl",
        ModelSource(published_config("sdxl")["hub_id"]),
        1024,
        50,
        5.0,
        Recipe(steps=500, learning_rate=1e-4, rank=4, batch_size=4),
    ),
    "Stable Diffusion XL base 1.0 (1024 px; 50 steps, CFG 5)",
)
