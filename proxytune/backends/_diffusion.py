"""The shared core of the diffusion supervisors: pipelines from configs or releases, LoRA on the
denoiser, VAE latents, the two training objectives, saving, fusing and sampling.

A family module (`stable_diffusion.py`, `sdxl.py`, `sd3.py`, `flux.py`) says which diffusers
pipeline it is, how a prompt becomes the denoiser's conditioning, which objective it trains
with and its reference recipe (the diffusers DreamBooth-LoRA example's defaults). Published
component configs are kept as data (`configs/<name>.json`, the same format for the `tiny-*`
twins), so a `random:<config>` source builds the real architecture with random weights, with
the depth cut for real-shape twins.

Objectives:
- `ddpm_loss` (SD 1.5, SDXL): uniform timesteps, DDPM noise, epsilon or v target, MSE;
- `flow_matching_loss` (SD3, FLUX): x_sigma = (1 - sigma) x + sigma noise with sigmas from the
  training scheduler; SD3 draws u from a logit-normal (0, 1) and preconditions the output
  (target x), FLUX draws u uniformly (target noise - x).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image

from proxytune.backends._base import ModelSource, seeded, training_dtype, write_adapter_config
from proxytune.backends._checkpoints import published_config, random_config_name
from proxytune.backends._tokenizers import byte_level_tokenizer, tiny_clip_tokenizer

log = logging.getLogger(__name__)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
Conditioning = dict[str, torch.Tensor]  # batch-first tensors the denoiser takes


@dataclass(frozen=True)
class Recipe:
    """A backend's DreamBooth-LoRA defaults (diffusers' examples), used where a run sets none."""

    steps: int
    learning_rate: float
    rank: int
    batch_size: int


def repeat(cond: Conditioning, count: int) -> Conditioning:
    """Conditioning of one prompt for `count` images."""
    return {k: v.expand(count, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}


def take(cond: Conditioning, rows: torch.Tensor | slice) -> Conditioning:
    return {k: v[rows] if v.dim() and v.shape[0] > 1 else v for k, v in cond.items()}


class DiffusionSupervisor(ABC):
    """A diffusers pipeline tuned with LoRA on its denoiser (`unet` or `transformer`)."""

    name: str
    source: ModelSource
    resolution: int  # native size: training and sampling
    inference_steps: int  # the reference model's sampling steps
    guidance_scale: float  # and guidance, where a run sets none
    pipeline_class: ClassVar[str]
    denoiser_name: ClassVar[str]
    training_scheduler_class: ClassVar[str]  # DDPM for UNets, the flow-matching scheduler for DiTs
    lora_targets: ClassVar[tuple[str, ...]]
    recipe: Recipe
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(
        self, name: str, source: ModelSource, resolution: int, steps: int, guidance: float, recipe: Recipe
    ):
        self.name, self.source, self.resolution = name, source, resolution
        self.inference_steps, self.guidance_scale, self.recipe = steps, guidance, recipe

    def generation(self, steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        """(steps, guidance) with the backend's reference values where none is given."""
        return steps or self.inference_steps, guidance_scale or self.guidance_scale

    # -- family hooks -------------------------------------------------------------------

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> the denoiser's conditioning (batch first)."""

    @abstractmethod
    def training_loss(
        self, latents: torch.Tensor, cond: Conditioning, generator: torch.Generator
    ) -> torch.Tensor:
        """The family's objective on VAE latents; all randomness from `generator`."""

    # -- shared -------------------------------------------------------------------------

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def load(
        self, device: torch.device, source: ModelSource | None = None, layers: int | None = None
    ) -> None:
        """The frozen pipeline: a release (hub id, folder, s3:// prefix) or `random:<config>`."""
        import diffusers

        source = source or self.source
        dtype = training_dtype(device)
        config_name = random_config_name(source)
        if config_name:
            pipe = random_pipeline(config_name, layers, dtype, **self.pipeline_kwargs)
        else:
            pipe = getattr(diffusers, self.pipeline_class).from_pretrained(
                source.local_or_hub(), revision=source.revision, torch_dtype=dtype, **self.pipeline_kwargs
            )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
        self.pipe, self.device = pipe, device
        self.training_scheduler = getattr(diffusers, self.training_scheduler_class).from_config(
            self.pipe.scheduler.config
        )
        self.loaded_source = source

    def autocast(self):
        """bf16 autocast for bf16 weights (fp32 LoRA layers and inputs meet them there)."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.denoiser.dtype == torch.bfloat16
        )

    def add_lora(self, rank: int, alpha: float) -> list[torch.nn.Parameter]:
        from peft import LoraConfig

        config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(self.lora_targets)
        )
        self.denoiser.add_adapter(config)
        if self.device.type == "cuda":
            self.denoiser.enable_gradient_checkpointing()
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        return params

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior means of the frozen VAE, shifted and scaled as the denoiser was trained
        (computed once per run; their spread is negligible next to the diffusion noise)."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean.float()
        return (latents - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor

    def save_lora(self, out_dir: str) -> list[str]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        config = self.denoiser.peft_config["default"]
        layers = get_peft_model_state_dict(self.denoiser)
        if self.denoiser_name == "unet":  # UNet LoRAs are stored in diffusers' naming, DiT ones as peft's
            layers = convert_state_dict_to_diffusers(layers)
        type(self.pipe).save_lora_weights(
            out_dir,
            weight_name=LORA_WEIGHTS,
            **{
                f"{self.denoiser_name}_lora_layers": layers,
                f"{self.denoiser_name}_lora_adapter_metadata": config.to_dict(),
            },
        )
        return [LORA_WEIGHTS, write_adapter_config(out_dir, config)]

    def load_lora(self, adapter_dir: str) -> None:
        self.pipe.load_lora_weights(adapter_dir, weight_name=LORA_WEIGHTS)

    def fuse_lora(self) -> None:
        """Merge the loaded adapter into the denoiser's weights: sampling at full speed."""
        self.pipe.fuse_lora()

    def save(self, folder: str | Path) -> None:
        """The pipeline in the hub's diffusers layout (`model_index.json` + one folder per component)."""
        self.pipe.save_pretrained(folder)

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

    # -- objectives ---------------------------------------------------------------------

    def ddpm_loss(self, latents: torch.Tensor, generator: torch.Generator, predict, **_: Any) -> torch.Tensor:
        """Uniform timesteps; epsilon or v-prediction target (the scheduler's)."""
        schedule = self.training_scheduler
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = torch.randint(
            0, schedule.config.num_train_timesteps, (latents.shape[0],), generator=generator
        )
        steps = steps.to(self.device)
        noisy = schedule.add_noise(latents, noise, steps)
        target = (
            schedule.get_velocity(latents, noise, steps)
            if schedule.config.prediction_type == "v_prediction"
            else noise
        )
        with self.autocast():
            prediction = predict(noisy.to(self.denoiser.dtype), steps)
        return F.mse_loss(prediction.float(), target.float())

    def flow_matching_loss(
        self,
        latents: torch.Tensor,
        generator: torch.Generator,
        predict,
        logit_normal: bool,
        precondition: bool,
    ) -> torch.Tensor:
        """x_sigma = (1 - sigma) x + sigma noise, sigmas from the training scheduler."""
        schedule = self.training_scheduler
        count = latents.shape[0]
        draws = (
            torch.randn(count, generator=generator).sigmoid()
            if logit_normal
            else torch.rand(count, generator=generator)
        )
        index = (draws * schedule.config.num_train_timesteps).long().clamp(max=len(schedule.timesteps) - 1)
        sigmas = schedule.sigmas[index].to(self.device).view(-1, *[1] * (latents.dim() - 1))
        timesteps = schedule.timesteps[index].to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        with self.autocast():
            prediction = predict(noisy.to(self.denoiser.dtype), timesteps).float()
        if precondition:
            return F.mse_loss(prediction * -sigmas + noisy, latents)
        return F.mse_loss(prediction, noise - latents)


def random_pipeline(name: str, layers: int | None, dtype: torch.dtype, **kwargs: Any):
    """The published pipeline `name` (configs/<name>.json) built with random weights: each
    component from its config, tokenizers in memory; `layers` cuts the denoiser's and the
    text encoders' depth (real-shape twins)."""
    import diffusers

    spec = published_config(name)
    parts: dict[str, Any] = {}
    with seeded(0):
        for key, component in spec["components"].items():
            parts[key] = _component(component, layers)
    for module in parts.values():
        if isinstance(module, torch.nn.Module) and dtype != torch.float32:
            module.to(dtype)
    return getattr(diffusers, spec["pipeline"])(**parts, **kwargs)


def _component(component: dict[str, Any], layers: int | None):
    import diffusers
    import transformers

    kind, config = component["class"], dict(component.get("config", {}))
    if kind == "clip-tokenizer":
        return tiny_clip_tokenizer(config["max_length"], config.get("pad", "<|endoftext|>"))
    if kind == "t5-tokenizer":
        return byte_level_tokenizer(
            {"<pad>": 0, "</s>": 1, "<unk>": 2}, None, "</s>", "<pad>", config["max_length"]
        )
    if layers is not None:
        config.update(_cut_depth(kind, config, layers))
    if hasattr(transformers, kind):  # text encoders: a config object, then the model
        model_class = getattr(transformers, kind)
        return model_class(model_class.config_class(**config))
    model_class = getattr(diffusers, kind)
    return model_class.from_config(config)


def _cut_depth(kind: str, config: dict[str, Any], layers: int) -> dict[str, Any]:
    """The config fields that set a component's depth, cut to `layers` (VAEs and schedulers keep theirs)."""
    if kind == "UNet2DConditionModel":
        blocks = len(config["down_block_types"])
        return {"layers_per_block": layers, "transformer_layers_per_block": [layers] * blocks}
    if kind == "SD3Transformer2DModel":
        return {"num_layers": layers}
    if kind == "FluxTransformer2DModel":
        return {"num_layers": layers, "num_single_layers": layers}
    if kind in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        return {"num_hidden_layers": layers}
    if kind == "T5EncoderModel":
        return {"num_layers": layers}
    return {}
