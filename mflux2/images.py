"""PIL <-> MLX array conversion, in one place.

Arrays are NHWC (or HWC) float in [-1, 1], the VAE's pixel range: value = byte / 127.5 - 1.
Every PIL mode becomes RGB first; transparent pixels are composited on white.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 16-bit PNG/TIFF greyscale opens as one of these


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB. Alpha (RGBA, LA, PA, La, RGBa, or a palette/greyscale
    image with a `transparency` entry) is composited on white; 16-bit greyscale is rescaled, not
    clipped (PIL's own convert would saturate everything above 255)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT:
        # mode "I" (32-bit int) is what 16-bit PNGs decode to with older Pillow: read it as 0..65535
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.round(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")  # 2-D uint8 -> "L"
    if mode == "F":
        raise ValueError("float images (PIL mode 'F') have no defined pixel range: convert them to 8-bit first")
    if "A" in mode or "a" in mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except ValueError as e:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB ({e})") from None


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB, applying its EXIF orientation (phone photos are often stored
    sideways with an orientation tag)."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def pil_to_array(img: Image.Image) -> mx.array:
    """PIL image (any mode) -> [H, W, 3] float32 in [-1, 1]."""
    a = np.asarray(to_rgb(img), dtype=np.float32)
    return mx.array(a / 127.5 - 1.0)


def pils_to_array(images: list[Image.Image]) -> mx.array:
    """Same-size PIL images -> [B, H, W, 3] float32 in [-1, 1]."""
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"pils_to_array needs images of one size, got (width, height) {sorted(sizes)}")
    return mx.stack([pil_to_array(im) for im in images])


def array_to_pil(x) -> Image.Image:
    """[H, W, 3] array in [-1, 1] (mx or numpy, any float dtype) -> RGB PIL image. Values are
    clamped to [-1, 1] and rounded to the nearest byte."""
    a = np.asarray(x.astype(mx.float32) if isinstance(x, mx.array) else x, dtype=np.float32)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"array_to_pil expects [H, W, 3], got shape {a.shape} (use arrays_to_pils for a batch)")
    a = np.round((np.clip(a, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return Image.fromarray(a)  # [H, W, 3] uint8 -> "RGB"


def arrays_to_pils(x) -> list[Image.Image]:
    """[B, H, W, 3] array in [-1, 1] -> list of RGB PIL images."""
    if x.ndim != 4:
        raise ValueError(f"arrays_to_pils expects [B, H, W, 3], got shape {tuple(x.shape)}")
    return [array_to_pil(x[i]) for i in range(x.shape[0])]
