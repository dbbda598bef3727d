"""Prompts for `vlmtune predict`, read by the training data reader (`vlmtune.data`) in prompt mode: the
final assistant turn is optional (when present it is the reference answer, not part of the prompt), and a
row may carry `adapter` (which adapter runs it) and `id`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError


@dataclass(frozen=True)
class PromptRow:
    id: Any
    messages: list[dict[str, Any]]  # the prompt: every turn before the final assistant turn
    prompt: str  # the last user turn as written, `<image>` where each image goes (for preds.jsonl)
    images: list[Any]  # paths (resolved against the data file) or bytes
    reference: str | None
    adapter: str | None


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Every row of a data file as a prompt; fails naming every bad row (up to 10) before any work."""
    from ..data.formats import parse_row, read_rows, to_messages

    rows: list[PromptRow] = []
    errors: list[str] = []
    for index, raw in enumerate(read_rows(path)):
        sample, row_errors = parse_row(raw, prompt=True)
        errors += [str(e) for e in row_errors]
        if sample is None:
            continue
        missing = [p for p in sample.images if isinstance(p, Path) and not p.is_file()]
        if missing:
            errors.append(
                f"{raw.where}: image {missing[0]} does not exist (paths are relative to the data file)."
            )
            continue
        answered = sample.turns[-1].role == "assistant"
        rows.append(
            PromptRow(
                id=raw.value.get("id", index),
                messages=to_messages(sample, with_answer=not answered),
                prompt=sample.turns[-2 if answered else -1].text,
                images=list(sample.images),
                reference=sample.turns[-1].text if answered else None,
                adapter=raw.value.get("adapter"),
            )
        )
    if errors:
        shown = "\n  ".join(errors[:10])
        more = f"\n  (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        raise VlmtuneError(f"{len(errors)} row(s) of {path} cannot be used:\n  {shown}{more}")
    if not rows:
        raise VlmtuneError(f"{path} has no rows.")
    return rows
