"""Prompts for `vlmtune predict`, read from the training formats.

Files are read by `vlmtune.data.read_rows` (JSON, JSONL, parquet, a `datasets` folder); rows are parsed
here, more leniently than for training: the final assistant turn is optional (when present it is the
reference answer, not part of the prompt), and a row may carry `adapter` (which adapter runs it) and `id`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError
from .prompts import IMAGE_PLACEHOLDER

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class PromptDataError(VlmtuneError, ValueError):
    """Rows of a prediction data file that cannot be used; the message lists them."""


@dataclass(frozen=True)
class PromptRow:
    id: Any
    messages: list[dict[str, Any]]  # the prompt: every turn before the final assistant turn
    images: list[Any]  # paths (resolved against the data file) or bytes
    reference: str | None
    adapter: str | None


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Every row of a data file as a prompt; fails naming every bad row (up to 10) before any work."""
    from ..data.formats import read_rows

    rows: list[PromptRow] = []
    errors: list[str] = []
    for index, raw in enumerate(read_rows(path)):
        if raw.error is not None:
            errors.append(str(raw.error))
            continue
        try:
            rows.append(parse(raw.value, index, raw.base_dir))
        except PromptDataError as exc:
            errors.append(f"{raw.where}: {exc}")
    if errors:
        shown = "\n  ".join(errors[:10])
        more = f"\n  (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        raise PromptDataError(f"{len(errors)} row(s) of {path} cannot be used:\n  {shown}{more}")
    if not rows:
        raise PromptDataError(f"{path} has no rows.")
    return rows


def parse(value: Any, index: int, base_dir: Path) -> PromptRow:
    if not isinstance(value, dict):
        raise PromptDataError(f"a row must be an object (got {type(value).__name__}).")
    if "messages" in value and value["messages"] is not None:
        turns = [(m.get("role"), m.get("content")) for m in value["messages"] if isinstance(m, dict)]
        if len(turns) != len(value["messages"]):
            raise PromptDataError("every message must be an object with 'role' and 'content'.")
    elif "conversations" in value and value["conversations"] is not None:
        turns = []
        for turn in value["conversations"]:
            if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES:
                raise PromptDataError(f"LLaVA turn {turn!r} needs 'from' (human|gpt|system) and 'value'.")
            turns.append((LLAVA_ROLES[turn["from"]], turn.get("value")))
    else:
        raise PromptDataError(
            f"row has neither 'messages' nor 'conversations'; its keys are {sorted(value)}."
        )
    if not turns:
        raise PromptDataError("the conversation is empty.")
    for role, content in turns:
        if role not in ("system", "user", "assistant"):
            raise PromptDataError(f"role {role!r} is not one of system, user, assistant.")
        if not isinstance(content, (str, list)):
            raise PromptDataError(f"content must be a string or a list of parts (got {content!r}).")
    reference = None
    if turns[-1][0] == "assistant":
        answer = turns.pop()[1]
        reference = answer if isinstance(answer, str) else "".join(p.get("text", "") for p in answer)
    if not turns or turns[-1][0] != "user":
        raise PromptDataError(
            "the prompt must end with a user turn (optionally followed by the reference answer)."
        )
    images = images_of(value, base_dir)
    messages = [{"role": role, "content": content} for role, content in turns]
    slots = sum(count_images(content) for _, content in turns)
    if slots != len(images):
        raise PromptDataError(
            f"the prompt has {slots} {IMAGE_PLACEHOLDER} placeholder(s) but the row lists {len(images)} image(s)."
        )
    adapter = value.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise PromptDataError(f"'adapter' must be an adapter name (got {adapter!r}).")
    return PromptRow(value.get("id", index), messages, images, reference, adapter)


def count_images(content: str | list[Any]) -> int:
    if isinstance(content, str):
        return content.count(IMAGE_PLACEHOLDER)
    return sum(
        1
        if isinstance(p, dict) and p.get("type") == "image"
        else str(p.get("text", "")).count(IMAGE_PLACEHOLDER)
        for p in content
        if isinstance(p, dict)
    )


def images_of(value: dict[str, Any], base_dir: Path) -> list[Any]:
    raw = value.get("images", value.get("image"))
    if raw is None:
        return []
    out = []
    for item in raw if isinstance(raw, list) else [raw]:
        if isinstance(item, dict):
            item = item.get("bytes") or item.get("path")
        if isinstance(item, (bytes, bytearray)):
            out.append(bytes(item))
        elif isinstance(item, str) and item:
            path = Path(item).expanduser()
            path = path if path.is_absolute() else base_dir / path
            if not path.is_file():
                raise PromptDataError(f"image {path} does not exist (paths are relative to the data file).")
            out.append(path)
        else:
            raise PromptDataError(f"image entry {item!r} is not a path.")
    return out
