"""Opening images (from disk or bytes), checking them up front, and optional light augmentation."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

from .formats import ImageSource


def open_image(src: ImageSource) -> Any:
    """A fully decoded RGB PIL image. Decoding fully (`load`) is what catches truncated files."""
    from PIL import Image

    with Image.open(src if isinstance(src, Path) else io.BytesIO(src)) as img:
        img.load()
        return img.convert("RGB")


def image_problem(src: ImageSource) -> tuple[str, str] | None:
    """(code, reason) when `src` cannot serve as an image, else None."""
    if isinstance(src, Path):
        if not src.exists():
            return "image_missing", f"image {src} does not exist; paths are relative to the data file."
        if not src.is_file():
            return "image_missing", f"image {src} is not a file."
    try:
        img = open_image(src)
    except Exception as exc:  # PIL raises many types for bad files; all mean the same to the user
        name = src if isinstance(src, Path) else f"<{len(src)} bytes>"
        return (
            "image_corrupt",
            f"image {name} cannot be decoded ({type(exc).__name__}: {exc}); replace or remove it.",
        )
    if min(img.size) < 1:
        return "image_corrupt", f"image {src} is empty ({img.size[0]}x{img.size[1]})."
    return None


def augment(img: Any, rng: random.Random) -> Any:
    """Light, size-preserving augmentation: brightness/contrast/saturation within ±10% and a shift of at most
    4% of each side. The size stays, so the number of image tokens (and `max_length` checks) stays."""
    from PIL import ImageChops, ImageEnhance

    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(0.9, 1.1))
    dx = round(rng.uniform(-0.04, 0.04) * img.width)
    dy = round(rng.uniform(-0.04, 0.04) * img.height)
    if dx or dy:
        img = ImageChops.offset(img, dx, dy)
    return img
