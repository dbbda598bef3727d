"""Checking a row's images up front (opened by `vlmtune.conversation.open_image`), and optional light
augmentation."""

from __future__ import annotations

import random
from typing import Any

from ..conversation import ImageError, open_image
from .formats import ImageSource

__all__ = ["augment", "image_problem", "open_image"]


def image_problem(src: ImageSource) -> tuple[str, str] | None:
    """(code, reason) when `src` cannot serve as an image, else None."""
    try:
        open_image(src)
    except ImageError as exc:
        fix = "paths are relative to the data file" if exc.code == "image_missing" else "replace or remove it"
        return exc.code, f"{str(exc).rstrip('.')}; {fix}."
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
