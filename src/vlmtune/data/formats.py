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

from ..conversation import Conversation, Message, RowError, parse_turn, validate
from ..errors import VlmtuneError

# The ShareGPT-style `conversations` format (`from`: human|gpt|system, `value`), as LLaVA's data uses it.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
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
class Sample:
    """One row's conversation (images resolved to paths or bytes, in placeholder order) and where it came
    from (for error messages)."""

    conversation: Conversation
    where: str

    @property
    def turns(self) -> tuple[Message, ...]:
        return self.conversation.messages

    @property
    def images(self) -> tuple[ImageSource, ...]:
        return self.conversation.images

    @property
    def assistant_texts(self) -> list[str]:
        return [t.text for t in self.turns if t.role == "assistant"]


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
            "row has neither 'messages' (with 'images') nor ShareGPT-style 'conversations' (with 'image'); "
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
    if turns is None:
        return None, errors
    conversation = Conversation(tuple(turns), tuple(images or ()))
    problems = validate(conversation, answer="optional" if prompt else "required", where=where)
    if images is None:  # the images are unreadable: their count says nothing
        problems = [p for p in problems if p.code != "image_count"]
    errors += problems
    if errors or images is None:
        return None, errors
    return Sample(conversation, where), []


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


def _parse_turns(raw: Any, fmt: str, fail: Any) -> list[Message] | None:
    if not isinstance(raw, list):
        fail("conversation_type", f"'{fmt}' must be a list of turns (got {type(raw).__name__}).")
        return None
    if not raw:
        fail("empty_conversation", f"'{fmt}' is empty; a row needs at least one user and one assistant turn.")
        return None
    roles = None if fmt == "messages" else SHAREGPT_ROLES
    turns = [
        parse_turn(turn, f"turn {i}", fail, keys=TURN_KEYS[fmt], roles=roles) for i, turn in enumerate(raw)
    ]
    if any(t is None for t in turns):
        return None
    return [t[0] for t in turns if t is not None]


def to_messages(sample: Sample, with_answer: bool = True) -> list[dict[str, Any]]:
    """The sample as chat-template messages (see `Conversation.to_template`)."""
    return sample.conversation.to_template(with_answer)
