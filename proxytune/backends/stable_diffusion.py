"""Stable Diffusion (UNet, epsilon / v-prediction) supervisors: `tiny-sd`, `sd15`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from proxytune.backends._base import (
    ModelSource,
    SupervisorBackend,
    seeded,
    training_dtype,
    write_adapter_config,
)
from proxytune.backends._tokenizers import tiny_clip_tokenizer
from proxytune.registry import SUPERVISORS

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def _tiny_pipeline():
    """A real StableDiffusionPipeline with small configs and random weights (64 px)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    with seeded(0):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=4,
            sample_size=64,
            norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=len(tokenizer),
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class StableDiffusionSupervisor(SupervisorBackend):
    def __init__(self, name: str, source: ModelSource, resolution: int, steps: int, guidance: float):
        self.name, self.source, self.resolution = name, source, resolution
        self.inference_steps, self.guidance_scale = steps, guidance

    def load(self, device: torch.device, source: ModelSource | None = None) -> None:
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        source = source or self.source
        self.device = device
        if source.is_tiny:
            pipe = _tiny_pipeline()
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                source.local_or_hub(),
                revision=source.revision,
                torch_dtype=training_dtype(device),
                safety_checker=None,
                requires_safety_checker=False,
            )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        self.pipe = pipe
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def add_lora(self, rank: int, alpha: float) -> list[torch.nn.Parameter]:
        from peft import LoraConfig

        config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS
        )
        self.pipe.unet.add_adapter(config)
        params = [p for p in self.pipe.unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        return params

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior means of the frozen VAE (computed once; their spread is negligible for SD)."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean
        return latents.float() * vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.pipe.text_encoder(ids.to(self.device))[0]

    def training_loss(
        self, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        schedule = self.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = torch.randint(
            0, schedule.config.num_train_timesteps, (latents.shape[0],), generator=generator
        )
        steps = steps.to(self.device)
        noisy = schedule.add_noise(latents, noise, steps)
        if schedule.config.prediction_type == "v_prediction":
            target = schedule.get_velocity(latents, noise, steps)
        else:
            target = noise
        with self._autocast():
            prediction = self.pipe.unet(noisy, steps, cond).sample
        return F.mse_loss(prediction.float(), target.float())

    def save_lora(self, out_dir: str) -> list[str]:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet = self.pipe.unet
        config = unet.peft_config["default"]
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers=layers,
            weight_name=LORA_WEIGHTS,
            unet_lora_adapter_metadata=config.to_dict(),
        )
        return [LORA_WEIGHTS, write_adapter_config(out_dir, config)]

    def load_lora(self, adapter_dir: str) -> None:
        self.pipe.load_lora_weights(adapter_dir, weight_name=LORA_WEIGHTS)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance_scale: float
    ) -> list[Image.Image]:
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        return self.pipe(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=self.resolution,
            width=self.resolution,
            generator=generators,
        ).images


SUPERVISORS.register(
    "tiny-sd",
    lambda: StableDiffusionSupervisor("tiny-sd", ModelSource("tiny:sd"), 64, 10, 5.0),
    "random-weight Stable Diffusion (64 px) for tests and the CPU demo",
)
SUPERVISORS.register(
    "sd15",
    lambda: StableDiffusionSupervisor(
        "sd15", ModelSource("stable-diffusion-v1-5/stable-diffusion-v1-5"), 512, 50, 7.5
    ),
    "Stable Diffusion 1.5 (512 px; 50 steps, CFG 7.5)",
)
