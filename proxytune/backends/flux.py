"""FLUX.1 supervisors (double/single-stream transformer, flow matching): `tiny-flux`, `flux-dev`.

FLUX.1-dev is guidance-distilled: its guidance scale feeds an embedding, not classifier-free
guidance (3.5 in training, as diffusers' DreamBooth recipe, and at sampling). Latents are
packed into 2x2 patches with their position ids; training draws timesteps uniformly on the
scheduler's unshifted sigmas (the shift is dynamic, applied only at sampling) and predicts
noise - latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proxytune.backends._base import ModelSource
from proxytune.backends._checkpoints import published_config
from proxytune.backends._diffusion import Conditioning, DiffusionSupervisor, Recipe
from proxytune.backends.sd3 import LORA_TARGETS
from proxytune.core.registry import SUPERVISORS

TRAINING_GUIDANCE = 3.5
T5_TOKENS = 512


class FluxSupervisor(DiffusionSupervisor):
    pipeline_class = "FluxPipeline"
    denoiser_name = "transformer"
    training_scheduler_class = "FlowMatchEulerDiscreteScheduler"
    lora_targets = (*LORA_TARGETS, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        tokens = min(T5_TOKENS, self.pipe.tokenizer_2.model_max_length)
        embeds, pooled, _ = self.pipe.encode_prompt(
            list(prompts), None, device=self.device, max_sequence_length=tokens
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def training_loss(
        self, latents: torch.Tensor, cond: Conditioning, generator: torch.Generator
    ) -> torch.Tensor:
        pipe, transformer = self.pipe, self.pipe.transformer
        count, channels, height, width = latents.shape
        dtype = transformer.dtype
        image_ids = pipe._prepare_latent_image_ids(count, height // 2, width // 2, self.device, dtype)
        text_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=self.device, dtype=dtype)
        guidance = (
            torch.full((count,), TRAINING_GUIDANCE, device=self.device)
            if transformer.config.guidance_embeds
            else None
        )

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            packed = pipe._pack_latents(noisy, count, channels, height, width)
            out = transformer(
                hidden_states=packed,
                timestep=timesteps / 1000,
                guidance=guidance,
                txt_ids=text_ids,
                img_ids=image_ids,
                **cond,
            ).sample
            scale = pipe.vae_scale_factor
            return pipe._unpack_latents(out, height * scale, width * scale, scale)

        return self.flow_matching_loss(latents, generator, predict, logit_normal=False, precondition=False)


SUPERVISORS.register(
    "tiny-flux",
    lambda: FluxSupervisor(
        "tiny-flux",
        ModelSource("random:tiny-flux"),
        64,
        10,
        3.5,
        Recipe(steps=40, learning_rate=1e-3, rank=4, batch_size=1),
    ),
    "random-weight FLUX (64 px, guidance embedding, CLIP + T5) for tests and the CPU demo",
)
SUPERVISORS.register(
    "flux-dev",
    lambda: FluxSupervisor(
        "flux-dev",
        ModelSource(published_config("flux-dev")["hub_id"]),
        1024,
        28,
        3.5,
        Recipe(steps=500, learning_rate=1e-4, rank=4, batch_size=4),
    ),
    "FLUX.1-dev (1024 px; 28 steps, distilled guidance 3.5)",
)
