"""Stable Diffusion 3 supervisors (MMDiT, flow matching): `tiny-sd3`, `sd3` (SD3 Medium),
`sd3.5-large`.

Conditioning: CLIP-L and CLIP-G penultimate states (zero-padded to T5's width) followed by
T5-XXL's (77 tokens in training, as diffusers' DreamBooth recipe), and both CLIPs' pooled
projections. Training as that recipe: logit-normal(0, 1) timesteps on the scheduler's shifted
sigmas, the output preconditioned to predict the clean latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proxytune.backends._base import ModelSource
from proxytune.backends._checkpoints import published_config
from proxytune.backends._diffusion import Conditioning, DiffusionSupervisor, Recipe
from proxytune.core.registry import SUPERVISORS

TRAINING_T5_TOKENS = 77
LORA_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


class SD3Supervisor(DiffusionSupervisor):
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    training_scheduler_class = "FlowMatchEulerDiscreteScheduler"
    lora_targets = LORA_TARGETS

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts),
            None,
            None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=TRAINING_T5_TOKENS,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def training_loss(
        self, latents: torch.Tensor, cond: Conditioning, generator: torch.Generator
    ) -> torch.Tensor:
        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self.pipe.transformer(hidden_states=noisy, timestep=timesteps, **cond).sample

        return self.flow_matching_loss(latents, generator, predict, logit_normal=True, precondition=True)


def _register(name: str, steps: int, guidance: float, learning_rate: float, description: str) -> None:
    SUPERVISORS.register(
        name,
        lambda: SD3Supervisor(
            name,
            ModelSource(published_config(name)["hub_id"]),
            1024,
            steps,
            guidance,
            Recipe(steps=500, learning_rate=learning_rate, rank=4, batch_size=4),
        ),
        description,
    )


SUPERVISORS.register(
    "tiny-sd3",
    lambda: SD3Supervisor(
        "tiny-sd3",
        ModelSource("random:tiny-sd3"),
        64,
        10,
        5.0,
        Recipe(steps=40, learning_rate=1e-3, rank=4, batch_size=1),
    ),
    "random-weight SD3 (64 px, MMDiT, CLIP + T5) for tests and the CPU demo",
)
_register("sd3", 28, 7.0, 4e-4, "Stable Diffusion 3 Medium (1024 px; 28 steps, CFG 7)")
_register("sd3.5-large", 28, 3.5, 1e-4, "Stable Diffusion 3.5 Large (1024 px; 28 steps, CFG 3.5)")
