"""Image helpers shared by every stage: normalisation, tensors, grids."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_MAX = 65535


def normalize_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and return an RGB image; transparency is blended on white,
    high-bit-depth grey is scaled to 8 bits (`to_8bit`), never clipped."""
    image = to_8bit(ImageOps.exif_transpose(image))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grey (Pillow's "I;16*" modes, and "I" holding 0-65535) -> "L", scaling the 16-bit
    range onto 0-255: v -> round(v * 255 / 65535) = (v + 128) // 257 (exact: 65535 = 255 * 257,
    and no v falls half-way), so 0 -> 0 and 65535 -> 255. Pillow's own conversion clips at 255
    instead (a full-range 16-bit photo turns white). "I" values outside 0-65535 and float ("F")
    pixels have no known range and raise ValueError. Other modes are returned as they are
    (Pillow already reads 16-bit colour as 8-bit, keeping each sample's high byte)."""
    if image.mode == "F":
        raise ValueError("floating-point pixels have no fixed range; save the image with 8 or 16 bits")
    if image.mode != "I" and image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > SIXTEEN_BIT_MAX):
        raise ValueError(
            f"32-bit integer pixels ({values.min()} to {values.max()}) have no known range; "
            "save the image with 8 or 16 bits"
        )
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


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
