"""Turning a request's messages and images into what a chat template and a processor take.

Every family's chat template here reads typed content parts (`{"type": "image"}` where an image goes), so
a content string with `<image>` placeholders is split into parts, and images are matched to image parts
in order. The count must agree, or the request fails before anything runs.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


class PromptError(VlmtuneError, ValueError):
    """A request whose messages or images cannot be turned into model input."""


def split_placeholders(text: str) -> list[dict[str, Any]]:
    """'<image>\\nWhat is it?' -> [{'type': 'image'}, {'type': 'text', 'text': 'What is it?'}].

    One newline right after a placeholder is dropped (LLaVA writes `<image>\\n`); empty text parts go.
    """
    parts: list[dict[str, Any]] = []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            if piece.startswith("\n"):
                piece = piece[1:]
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def normalize(
    messages: list[dict[str, Any]] | str, images: list[Any]
) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages with typed parts, images in order). Images embedded in parts (`"image"`/`"path"`/`"url"`
    with a local path) are taken out into the list; a bare string becomes one user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise PromptError("a request needs at least one message ({'role': 'user', 'content': ...}).")
    out: list[dict[str, Any]] = []
    embedded: list[Any] = []  # one entry per image part: the image it carries, or None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise PromptError(f"message {i} must be an object with 'role' and 'content' (got {message!r}).")
        role = message["role"]
        if role not in ROLES:
            raise PromptError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}.")
        content = message["content"]
        if isinstance(content, str):
            parts = split_placeholders(content)
            embedded.extend(None for p in parts if p["type"] == "image")
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    new = split_placeholders(part["text"])
                    embedded.extend(None for p in new if p["type"] == "image")
                    parts.extend(new)
                elif kind in ("image", "image_url"):
                    parts.append({"type": "image"})
                    embedded.append(image_source(part))
                else:
                    raise PromptError(
                        f"message {i} content part {j} is {part!r}; parts are {{'type': 'text', 'text': ...}} "
                        "or {'type': 'image'}."
                    )
        else:
            raise PromptError(
                f"message {i} content must be a string or a list of parts (got {type(content).__name__})."
            )
        if role != "user" and any(p["type"] == "image" for p in parts):
            raise PromptError(f"message {i} ({role}) holds an image; images go in user messages.")
        out.append({"role": role, "content": parts})
    carried = [src for src in embedded if src is not None]
    if carried and images:
        raise PromptError("pass images either inside the message parts or in `images`, not both.")
    if carried and len(carried) != len(embedded):
        raise PromptError("some image parts carry an image and some do not; give every image part its image.")
    ordered = carried or list(images)
    if len(ordered) != len(embedded):
        raise PromptError(
            f"the messages have {len(embedded)} image placeholder(s) but {len(ordered)} image(s) were given; "
            f"put one {IMAGE_PLACEHOLDER} (or one image part) where each image goes."
        )
    return out, ordered


def image_source(part: dict[str, Any]) -> Any:
    """The image an image part carries (`image`, `path`, `url`, or OpenAI's `image_url: {url}`), or None."""
    for key in ("image", "path", "url", "image_url"):
        value = part.get(key)
        if isinstance(value, dict):
            value = value.get("url")
        if value is not None:
            return value
    return None


def open_image(source: Any) -> Any:
    """A decoded RGB PIL image from a PIL image, a path, bytes, or a `data:` URL."""
    import base64

    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray)):
        data: Any = io.BytesIO(bytes(source))
    elif isinstance(source, str) and source.startswith("data:"):
        try:
            data = io.BytesIO(base64.b64decode(source.split(",", 1)[1]))
        except (IndexError, ValueError) as exc:
            raise PromptError(f"a data: URL image could not be decoded ({exc}).") from None
    elif isinstance(source, (str, Path)):
        if str(source).startswith(("http://", "https://")):
            raise PromptError(
                f"image {source}: remote URLs are not fetched; download the image and pass its path."
            )
        data = Path(source).expanduser()
        if not data.is_file():
            raise PromptError(f"image {data} does not exist.")
    else:
        raise PromptError(
            f"cannot use a {type(source).__name__} as an image; pass a path, bytes or a PIL image."
        )
    try:
        with Image.open(data) as img:
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad files; all mean the same to the user
        raise PromptError(
            f"image {source if not isinstance(source, bytes) else '<bytes>'} cannot be decoded ({exc})."
        ) from None
