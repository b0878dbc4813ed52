"""Image helpers shared by every stage: normalisation, tensors, grids."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps


def normalize_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and return an RGB image; transparency is blended on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def center_square(image: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square and resize (bicubic) to `size` x `size`."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)


def to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Images -> float tensor (N, 3, size, size) in [-1, 1]; transparency blended on white."""
    arrays = [np.asarray(center_square(normalize_rgb(im), size), dtype=np.float32) for im in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch / 127.5 - 1.0


def to_pil(pixels: torch.Tensor, channels_last: bool = False) -> list[Image.Image]:
    """Float tensor in [-1, 1], (N, 3, H, W) or (N, H, W, 3) -> PIL images."""
    pixels = pixels.detach().float().cpu()
    if not channels_last:
        pixels = pixels.permute(0, 2, 3, 1)
    arrays = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arrays]


def image_grid(
    images: Sequence[Image.Image], columns: int | None = None, cell: int | None = None
) -> Image.Image:
    """Tile images into one picture (row-major); cells are `cell` px squares."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell = cell or max(images[0].size)
    grid = Image.new("RGB", (columns * cell, rows * cell), "white")
    for i, image in enumerate(images):
        grid.paste(center_square(image, cell), ((i % columns) * cell, (i // columns) * cell))
    return grid


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    """A PNG data URI, for self-contained HTML reports."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
