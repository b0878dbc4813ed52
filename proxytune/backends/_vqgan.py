"""Chameleon's VQGAN (Lumina-mGPT's image tokenizer), with the decoder transformers lacks.

transformers' `ChameleonVQVAE` ships the encoder, quantizer and convolutions only; image
generation needs the decoder too. `ChameleonVQGAN` holds all of them under the names of
Meta's released `tokenizer/vqgan.ckpt` state dict (`encoder.*`, `quant_conv`, `quantize`,
`post_quant_conv`, `decoder.*`), so converted weights load with a strict key check. The
decoder is the taming-transformers one the checkpoint was trained with: `conv_in`, a middle
block (resnet, attention, resnet), `num_res_blocks + 1` resnet blocks per level from the
lowest resolution up with nearest-neighbour upsampling and a 3x3 conv between levels
(`up[0]` is the full resolution), then GroupNorm, swish and `conv_out`.

On disk (a folder, hub id or `s3://` prefix): `config.json` (transformers'
`ChameleonVQVAEConfig`) and `model.safetensors`. `convert_checkpoint` makes that folder from
Meta's `vqgan.ckpt` and `vqgan.yaml`, reading the checkpoint with `weights_only=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# vqgan.yaml's ddconfig keys -> ChameleonVQVAEConfig fields
YAML_FIELDS = {
    "ch": "base_channels",
    "ch_mult": "channel_multiplier",
    "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions",
    "dropout": "dropout",
    "in_channels": "in_channels",
    "resolution": "resolution",
    "z_channels": "latent_channels",
    "double_z": "double_latent",
}


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, config):
        from transformers.models.chameleon.modeling_chameleon import (
            ChameleonVQVAEEncoderAttnBlock as AttnBlock,
        )
        from transformers.models.chameleon.modeling_chameleon import (
            ChameleonVQVAEEncoderResnetBlock as ResnetBlock,
        )

        super().__init__()
        multipliers = list(config.channel_multiplier)
        levels = len(multipliers)
        channels = config.base_channels * multipliers[-1]
        resolution = config.resolution // 2 ** (levels - 1)
        attention_at = set(config.attn_resolutions or [])
        self.conv_in = nn.Conv2d(config.latent_channels, channels, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(config, channels, channels)
        self.mid.attn_1 = AttnBlock(channels)
        self.mid.block_2 = ResnetBlock(config, channels, channels)
        up = [nn.Module() for _ in range(levels)]
        for level in reversed(range(levels)):
            out = config.base_channels * multipliers[level]
            blocks, attentions = nn.ModuleList(), nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(config, channels, out))
                channels = out
                if resolution in attention_at:
                    attentions.append(AttnBlock(channels))
            up[level].block, up[level].attn = blocks, attentions
            if level != 0:
                up[level].upsample = Upsample(channels)
                resolution *= 2
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(channels, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden = self.conv_in(latents)
        hidden = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hidden)))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for index, block in enumerate(stage.block):
                hidden = block(hidden)
                if len(stage.attn) > 0:
                    hidden = stage.attn[index](hidden)
            if level != 0:
                hidden = stage.upsample(hidden)
        hidden = F.silu(self.norm_out(hidden))
        return self.conv_out(hidden)


class ChameleonVQGAN(nn.Module):
    """Encoder, quantizer and decoder of Chameleon's image tokenizer (8192 codes, 16x down)."""

    def __init__(self, config):
        from transformers.models.chameleon.modeling_chameleon import (
            ChameleonVQVAEEncoder,
            ChameleonVQVAEVectorQuantizer,
        )

        super().__init__()
        self.config = config
        self.encoder = ChameleonVQVAEEncoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.quantize = ChameleonVQVAEVectorQuantizer(config)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = Decoder(config)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.config.channel_multiplier) - 1)

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> pre-quantisation latents (N, embed_dim, h, w)."""
        return self.quant_conv(self.encoder(pixels))

    def decode(self, codes: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Codes (N, rows*cols), raster order -> pixels in [-1, 1] (N, 3, 16 rows, 16 cols)."""
        embedded = self.quantize.embedding(codes).view(codes.shape[0], rows, cols, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(embedded))

    @classmethod
    def from_config_dict(cls, values: dict) -> ChameleonVQGAN:
        from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig

        return cls(ChameleonVQVAEConfig(**values))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})

    @classmethod
    def load(cls, folder: str | Path) -> ChameleonVQGAN:
        """From a converted folder, every weight checked present (strict)."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(
                f"{folder} holds no converted Chameleon VQGAN ({CONFIG_FILE} + {WEIGHTS_FILE}); "
                "make one with `proxytune convert-vqgan`"
            )
        with torch.device("meta"):
            model = cls.from_config_dict(json.loads((folder / CONFIG_FILE).read_text()))
        _load_strict(model, load_file(folder / WEIGHTS_FILE), str(folder))
        return model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{where}: not a Chameleon VQGAN of this configuration: "
            f"{len(missing)} missing weight(s) {sorted(missing)[:3]}, "
            f"{len(unexpected)} unexpected {sorted(unexpected)[:3]}"
        )


def convert_checkpoint(checkpoint: str | Path, config_yaml: str | Path, out_dir: str | Path) -> Path:
    """Meta's `vqgan.ckpt` + `vqgan.yaml` -> a folder `ChameleonVQGAN.load` reads.

    The checkpoint is read with `weights_only=True` (no code in it runs); training-only keys
    (`loss.*`, the discriminator) are dropped, every model weight must be there."""
    import yaml

    from proxytune.core.fsutil import atomic_directory

    params = yaml.safe_load(Path(config_yaml).read_text())["model"]["params"]
    values = {
        field: params["ddconfig"][key] for key, field in YAML_FIELDS.items() if key in params["ddconfig"]
    }
    values.update(embed_dim=params["embed_dim"], num_embeddings=params["n_embed"])
    try:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # an unpickling refusal names the offending object
        raise ValueError(f"{checkpoint}: cannot be read as plain weights ({error})") from None
    state = loaded.get("state_dict", loaded)
    model = ChameleonVQGAN.from_config_dict(values)
    wanted = set(model.state_dict())
    _load_strict(model, {k: v for k, v in state.items() if k in wanted}, str(checkpoint))
    with atomic_directory(out_dir) as tmp:
        model.save(tmp)
    return Path(out_dir)
