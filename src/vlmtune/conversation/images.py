"""Opening an image under an allow-list: which decoders (formats) PIL may try, and which folder paths
may come from (the server's `--image-dir`); remote URLs are never fetched, `data:` URLs and bytes are
decoded in memory, and every image is decoded fully so a truncated file fails up front."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError

# Image formats opened by default: the ones datasets and chat clients use. PIL tries only these decoders.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
# An image as a conversation carries it: a path, encoded bytes, a `data:` URL string, or a PIL image.
ImageSource = Any


class ConversationError(VlmtuneError, ValueError):
    """Messages or images that cannot be turned into model input."""


class ImageError(ConversationError):
    """An image that cannot be used; `code` says why (image_missing, image_corrupt, image_refused)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImagePolicy:
    """Which images `open_image` accepts. `formats`: the PIL decoders tried. `root`: paths must lie inside
    this folder once resolved (relative ones are taken from it; symlinks out of it are refused); None
    allows any local path. `paths=False` refuses paths altogether (only inline bytes / `data:` URLs).
    `max_pixels` bounds width × height before decoding (None: PIL's own decompression-bomb limit)."""

    formats: tuple[str, ...] = IMAGE_FORMATS
    root: Path | str | None = None
    paths: bool = True
    max_pixels: int | None = None


DEFAULT_POLICY = ImagePolicy()


def open_image(source: ImageSource, policy: ImagePolicy = DEFAULT_POLICY) -> Any:
    """A fully decoded RGB PIL image from a PIL image, a path, bytes or a `data:` URL, under `policy`.
    Decoding fully (`load`) is what catches truncated files. Remote URLs are never fetched."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    name = "<bytes>"
    if isinstance(source, (bytes, bytearray)):
        data: Any = io.BytesIO(bytes(source))
    elif isinstance(source, str) and source.startswith("data:"):
        name = "<data: URL>"
        try:
            data = io.BytesIO(base64.b64decode(source.split(",", 1)[1], validate=True))
        except (IndexError, ValueError, binascii.Error) as exc:
            raise ImageError("image_corrupt", f"a data: URL image could not be decoded ({exc}).") from None
    elif isinstance(source, (str, Path)):
        if str(source).startswith(("http://", "https://")):
            raise ImageError(
                "image_refused",
                f"image {source}: remote URLs are not fetched; download the image and pass its path.",
            )
        data = resolve_path(Path(source), policy)
        name = str(data)
    else:
        raise ImageError(
            "image_corrupt",
            f"cannot use a {type(source).__name__} as an image; pass a path, bytes, a data: URL or a PIL image.",
        )
    try:
        with Image.open(data, formats=list(policy.formats)) as img:
            if policy.max_pixels is not None and img.width * img.height > policy.max_pixels:
                raise ImageError(
                    "image_refused",
                    f"image {name} is {img.width}x{img.height}, more than the {policy.max_pixels} pixels allowed.",
                )
            img.load()
            if min(img.size) < 1:
                raise ImageError("image_corrupt", f"image {name} is empty ({img.width}x{img.height}).")
            return img.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:  # PIL raises many types for bad files; all mean the same to the user
        raise ImageError(
            "image_corrupt",
            f"image {name} cannot be decoded as {'/'.join(policy.formats)} ({type(exc).__name__}: {exc}).",
        ) from None


def resolve_path(path: Path, policy: ImagePolicy) -> Path:
    """The file an image path names under `policy`, or an ImageError (refused, missing, not a file)."""
    if not policy.paths:
        raise ImageError(
            "image_refused", f"image {path}: image paths are not accepted here; send the image inline."
        )
    path = path.expanduser()
    if policy.root is not None:
        root = Path(policy.root).expanduser().resolve()
        resolved = (path if path.is_absolute() else root / path).resolve()
        if not resolved.is_relative_to(root):
            raise ImageError("image_refused", f"image {path} lies outside the image folder {policy.root}.")
        path = resolved
    if not path.exists():
        raise ImageError("image_missing", f"image {path} does not exist.")
    if not path.is_file():
        raise ImageError("image_missing", f"image {path} is not a file.")
    return path
