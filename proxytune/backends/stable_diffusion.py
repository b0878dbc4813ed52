"""Stable Diffusion 1.x supervisors (UNet, epsilon or v-prediction): `tiny-sd`, `sd15`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from proxytune.backends._base import ModelSource
from proxytune.backends._checkpoints import published_config
from proxytune.backends._diffusion import Conditioning, DiffusionSupervisor, Recipe
from proxytune.core.registry import SUPERVISORS


class StableDiffusionSupervisor(DiffusionSupervisor):
    pipeline_class = "StableDiffusionPipeline"
    denoiser_name = "unet"
    training_scheduler_class = "DDPMScheduler"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    pipeline_kwargs: ClassVar[dict[str, Any]] = {
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds}

    def training_loss(
        self, latents: torch.Tensor, cond: Conditioning, generator: torch.Generator
    ) -> torch.Tensor:
        def predict(noisy: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            return self.pipe.unet(noisy, steps, cond["encoder_hidden_states"]).sample

        return self.ddpm_loss(latents, generator, predict)


SUPERVISORS.register(
    "tiny-sd",
    lambda: StableDiffusionSupervisor(
        "tiny-sd",
        ModelSource("random:tiny-sd"),
        64,
        10,
        5.0,
        Recipe(steps=40, learning_rate=1e-3, rank=4, batch_size=1),
    ),
    "random-weight Stable Diffusion (64 px) for tests and the CPU demo",
)
SUPERVISORS.register(
    "sd15",
    lambda: StableDiffusionSupervisor(
        "sd15",
        ModelSource(published_config("sd15")["hub_id"]),
        512,
        50,
        7.5,
        Recipe(steps=500, learning_rate=1e-4, rank=4, batch_size=1),
    ),
    "Stable Diffusion 1.5 (512 px; 50 steps, CFG 7.5)",
)
