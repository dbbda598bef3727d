"""Dataset formats -> one internal sample type, with a row-level reason for every row that cannot be used.

Accepted (JSON array, JSONL, a `datasets` folder saved with `save_to_disk`, or parquet):
- `messages` + `images` (LLaMA-Factory / swift style): roles `system|user|assistant`, content a string with
  `<image>` placeholders (or a list of `{"type": "text"|"image"}` parts).
- LLaVA `conversations` + `image`: turns `{"from": "human"|"gpt"|"system", "value": ...}`.
Image paths are relative to the data file (or the dataset folder). The placeholder count must equal the
number of images. Reading never decodes images; `vlmtune.data.check` does that.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# Keys a row may carry besides its conversation; everything else is reported (strict over silent).
ROW_KEYS = {
    "messages": {"messages", "images", "image", "id"},
    "conversations": {"conversations", "images", "image", "id"},
}
# Keys a prediction row may carry besides those (`vlmtune predict`: which adapter runs the row).
PROMPT_KEYS = {"adapter"}
TURN_KEYS = {"messages": ("role", "content"), "conversations": ("from", "value")}
SUFFIXES = (".json", ".jsonl", ".parquet")


class DataError(VlmtuneError, ValueError):
    """A data file that cannot be read at all (missing, wrong kind, not JSON)."""


# An image: a path on disk, or encoded bytes (from a `datasets` Image column).
ImageSource = Path | bytes


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    text: str  # user/system text keeps its `<image>` placeholders


@dataclass(frozen=True)
class Sample:
    """One conversation ready for training: turns in order, images in placeholder order, and where it came
    from (for error messages)."""

    turns: tuple[Turn, ...]
    images: tuple[ImageSource, ...]
    where: str

    @property
    def assistant_texts(self) -> list[str]:
        return [t.text for t in self.turns if t.role == "assistant"]


@dataclass(frozen=True)
class RowError:
    """Why one row cannot be used. `code` is stable (for tests and tools); `message` says what to do."""

    where: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class RawRow:
    where: str
    value: Any  # the decoded row, or None when `error` says why it could not be decoded
    base_dir: Path
    error: RowError | None = None


# -- reading files ----------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every row of a data file or dataset folder, with its human-readable location."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist.")
    if path.is_dir():
        yield from _read_dataset_dir(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".parquet":
        yield from _read_hf(_load_parquet([path]), path, path.parent)
    else:
        raise DataError(
            f"{path}: unknown data file type {suffix or '(none)'!r}; use .json, .jsonl, .parquet "
            "or a folder written by datasets' save_to_disk."
        )


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRow(
                    where,
                    None,
                    path.parent,
                    RowError(where, "invalid_json", f"not valid JSON ({exc.msg}); fix or remove the line."),
                )
                continue
            yield RawRow(where, value, path.parent)


def _read_json(path: Path) -> Iterator[RawRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file.") from None
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON array of rows (got {type(data).__name__}); or use JSONL.")
    for index, value in enumerate(data):
        yield RawRow(f"{path} index {index}", value, path.parent)


def _load_parquet(files: list[Path]) -> Any:
    import datasets

    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


def _read_dataset_dir(path: Path) -> Iterator[RawRow]:
    import datasets

    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(
                f"{path} holds several splits ({', '.join(ds)}); pass the folder of one split, "
                f"e.g. {path / next(iter(ds))}."
            )
    else:
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DataError(
                f"{path} is neither a datasets save_to_disk folder nor a folder of .parquet files."
            )
        ds = _load_parquet(files)
    yield from _read_hf(ds, path, path)


def _read_hf(ds: Any, path: Path, base_dir: Path) -> Iterator[RawRow]:
    """Rows of a `datasets.Dataset`; Image columns are read undecoded ({'bytes', 'path'})."""
    import datasets

    for column in ("images", "image"):
        if column not in ds.column_names:
            continue
        feature = ds.features[column]
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            ds = ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    for index, value in enumerate(ds):
        yield RawRow(f"{path} row {index}", value, base_dir)


# -- parsing and validating one row -----------------------------------------------------------------------


def parse_row(row: RawRow, prompt: bool = False) -> tuple[Sample | None, list[RowError]]:
    """Turn a raw row into a Sample, or give every reason it cannot be one (images are not opened here).

    `prompt=True` reads a row for prediction: the final assistant turn (the reference answer) is optional,
    and the row may name its `adapter`.
    """
    if row.error is not None:
        return None, [row.error]
    where, value = row.where, row.value
    errors: list[RowError] = []

    def fail(code: str, message: str) -> None:
        errors.append(RowError(where, code, message))

    if not isinstance(value, dict):
        fail("not_object", f"a row must be a JSON object (got {type(value).__name__}).")
        return None, errors
    formats = [k for k in ("messages", "conversations") if k in value and value[k] is not None]
    if len(formats) == 2:
        fail("both_formats", "row has both 'messages' and 'conversations'; keep one of them.")
        return None, errors
    if not formats:
        fail(
            "no_conversation",
            "row has neither 'messages' (with 'images') nor LLaVA's 'conversations' (with 'image'); "
            f"its keys are {sorted(value)}.",
        )
        return None, errors
    fmt = formats[0]
    allowed = ROW_KEYS[fmt] | (PROMPT_KEYS if prompt else set())
    unknown = sorted(k for k, v in value.items() if k not in allowed and v is not None)
    if unknown:
        fail("unknown_key", f"unknown key(s) {unknown} in a '{fmt}' row; allowed: {sorted(allowed)}.")
    if prompt and value.get("adapter") is not None and not isinstance(value["adapter"], str):
        fail("adapter_type", f"'adapter' must be the name of a loaded adapter (got {value['adapter']!r}).")
    images = _parse_images(value, row.base_dir, fail)
    turns = _parse_turns(value[fmt], fmt, fail)
    if turns is not None:
        _check_order(turns, fail, answer_required=not prompt)
        _check_empty(turns, fail)
        _check_placeholders(turns, images, fail)
    if errors or turns is None or images is None:
        return None, errors
    return Sample(tuple(turns), tuple(images), where), []


def _parse_images(value: dict[str, Any], base_dir: Path, fail: Any) -> list[ImageSource] | None:
    present = [k for k in ("images", "image") if value.get(k) is not None]
    if len(present) == 2:
        fail("images_type", "row has both 'images' and 'image'; keep one list of images.")
        return None
    if not present:
        return []
    raw = value[present[0]]
    items = raw if isinstance(raw, list) else [raw]
    out: list[ImageSource] = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item.strip():
            out.append(_resolve(item, base_dir))
        elif isinstance(item, dict) and item.get("bytes"):
            out.append(bytes(item["bytes"]))
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
            out.append(_resolve(item["path"], base_dir))
        else:
            fail(
                "images_type",
                f"'{present[0]}' item {i} is {item!r}; each image must be a path (relative to the data file).",
            )
            return None
    return out


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base_dir / p


def _parse_turns(raw: Any, fmt: str, fail: Any) -> list[Turn] | None:
    if not isinstance(raw, list):
        fail("conversation_type", f"'{fmt}' must be a list of turns (got {type(raw).__name__}).")
        return None
    if not raw:
        fail("empty_conversation", f"'{fmt}' is empty; a row needs at least one user and one assistant turn.")
        return None
    role_key, content_key = TURN_KEYS[fmt]
    turns: list[Turn] = []
    ok = True
    for i, turn in enumerate(raw):
        label = f"turn {i}"
        if not isinstance(turn, dict):
            fail(
                "turn_type",
                f"{label} must be an object with '{role_key}' and '{content_key}' (got {turn!r}).",
            )
            ok = False
            continue
        missing = [k for k in (role_key, content_key) if k not in turn]
        if missing:
            fail("turn_missing_field", f"{label} lacks {' and '.join(repr(m) for m in missing)}.")
            ok = False
            continue
        extra = sorted(set(turn) - {role_key, content_key})
        if extra:
            fail(
                "unknown_turn_key",
                f"{label} has unknown key(s) {extra}; a turn has only '{role_key}' and '{content_key}'.",
            )
            ok = False
        role = _role(turn[role_key], fmt)
        if role is None:
            allowed = ROLES if fmt == "messages" else tuple(LLAVA_ROLES)
            fail(
                "unknown_role", f"{label} has {role_key} {turn[role_key]!r}; use one of {', '.join(allowed)}."
            )
            ok = False
            continue
        text = _content_text(turn[content_key], label, fail)
        if text is None:
            ok = False
            continue
        turns.append(Turn(role, text))
    return turns if ok else None


def _role(value: Any, fmt: str) -> str | None:
    if not isinstance(value, str):
        return None
    if fmt == "messages":
        return value if value in ROLES else None
    return LLAVA_ROLES.get(value)


def _content_text(content: Any, label: str, fail: Any) -> str | None:
    """Text of a turn; `{"type": "image"}` parts become `<image>` placeholders."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}:
                pieces.append(part["text"])
            elif kind == "image" and set(part) == {"type"}:
                pieces.append(IMAGE_PLACEHOLDER)
            else:
                fail(
                    "content_type",
                    f"{label} content part {j} is {part!r}; parts are {{'type': 'text', 'text': ...}} or "
                    "{'type': 'image'} (image paths go in the row's 'images').",
                )
                return None
        return "".join(pieces)
    fail("content_type", f"{label} content must be a string (got {type(content).__name__}: {content!r}).")
    return None


def _check_order(turns: list[Turn], fail: Any, answer_required: bool = True) -> None:
    """Optional system turn first, then user/assistant alternating, ending with an assistant reply (or, for
    prediction prompts, with the user turn to answer)."""
    body = turns
    for i, turn in enumerate(turns):
        if turn.role == "system" and i > 0:
            fail("role_order", f"turn {i} is a system turn; only the first turn may be a system turn.")
            return
    if turns[0].role == "system":
        body = turns[1:]
    offset = len(turns) - len(body)
    if not body:
        fail(
            "no_assistant", "the conversation has only a system turn; add a user turn and an assistant reply."
        )
        return
    if body[0].role != "user":
        fail(
            "role_order",
            f"turn {offset} is {body[0].role}; a conversation starts with a user turn (after an optional system turn).",
        )
        return
    for i in range(1, len(body)):
        if body[i].role == body[i - 1].role:
            fail(
                "role_order",
                f"turns {offset + i - 1} and {offset + i} are both {body[i].role} turns; user and assistant turns must alternate.",
            )
            return
    if body[-1].role != "assistant" and answer_required:
        fail(
            "no_assistant",
            f"the last turn ({offset + len(body) - 1}) is a user turn with no assistant reply; add the reply or drop the turn.",
        )


def _check_empty(turns: list[Turn], fail: Any) -> None:
    for i, turn in enumerate(turns):
        if turn.role == "assistant" and not turn.text.strip():
            fail(
                "empty_assistant", f"turn {i} is an empty assistant turn; there is nothing to learn from it."
            )
        if turn.role == "user" and not turn.text.strip():
            fail("empty_user", f"turn {i} is an empty user turn.")


def _check_placeholders(turns: list[Turn], images: list[ImageSource] | None, fail: Any) -> None:
    for i, turn in enumerate(turns):
        if turn.role != "user" and IMAGE_PLACEHOLDER in turn.text:
            fail(
                "image_placeholder_role",
                f"turn {i} ({turn.role}) holds {IMAGE_PLACEHOLDER}; images may only appear in user turns.",
            )
    if images is None:
        return
    count = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if count != len(images):
        fail(
            "image_count",
            f"the text has {count} {IMAGE_PLACEHOLDER} placeholder(s) but the row lists {len(images)} image(s); "
            f"put one {IMAGE_PLACEHOLDER} where each image goes.",
        )


def to_messages(sample: Sample, with_answer: bool = True) -> list[dict[str, Any]]:
    """The sample as chat-template messages with typed content parts (`{"type": "image"}` where each
    `<image>` stood). `with_answer=False` drops the final assistant turn (for generation prompts)."""
    turns = sample.turns if with_answer else sample.turns[:-1]
    out = []
    for turn in turns:
        parts: list[dict[str, Any]] = []
        pieces = turn.text.split(IMAGE_PLACEHOLDER)
        for k, piece in enumerate(pieces):
            if k > 0:
                parts.append({"type": "image"})
                # LLaVA data writes "<image>\n<question>"; the template places the image itself.
                piece = piece.removeprefix("\n")
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": turn.role, "content": parts})
    return out
