"""Checking every row before training starts (`vlmtune data check` runs the same check alone).

Three passes: structure (formats.parse_row), images (every file opened and fully decoded, in threads), and,
when a processor is given, tokens: each row goes through the real collator, which finds rows the processor
rejects and measures lengths, so `max_length` truncation is counted before training and rows whose image
tokens or whole answer would be cut are reported instead of failing mid-run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError
from .formats import RowError, Sample, parse_row, read_rows
from .images import image_problem


class InvalidDataError(VlmtuneError, ValueError):
    """Rows that cannot be trained on, with data.skip_invalid false."""


@dataclass
class DataReport:
    """The outcome of checking one data source."""

    source: str
    rows: int = 0
    samples: list[Sample] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    invalid_rows: int = 0
    truncated_rows: int = 0
    max_length: int | None = None
    # Token counts of the valid rows (with a processor): total and longest, before truncation.
    tokens: int = 0
    longest: int = 0
    # Tokens of each valid row (by `Sample.where`), before truncation: what length-aware batching plans with.
    lengths: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.source}: {self.rows} rows, {len(self.samples)} valid, {self.invalid_rows} invalid"]
        if self.longest:
            parts.append(f"{self.tokens} tokens, longest row {self.longest}")
        if self.max_length is not None:
            parts.append(f"{self.truncated_rows} truncated to max_length={self.max_length}")
        return "; ".join(parts) + "."

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "valid": len(self.samples),
            "invalid": self.invalid_rows,
            "truncated": self.truncated_rows,
            "max_length": self.max_length,
            "tokens": self.tokens,
            "longest": self.longest,
        }

    def enforce(self, skip_invalid: bool, show: int = 20) -> None:
        """Refuse invalid rows unless told to skip them; refuse a source with no usable row at all."""
        if self.invalid_rows and not skip_invalid:
            lines = [str(e) for e in self.errors[:show]]
            more = len(self.errors) - show
            if more > 0:
                lines.append(f"... and {more} more (run `vlmtune data check {self.source}` for all)")
            raise InvalidDataError(
                f"{self.invalid_rows} of {self.rows} rows in {self.source} are invalid; fix them or set "
                "data.skip_invalid: true to skip them:\n  " + "\n  ".join(lines)
            )
        if not self.samples:
            raise InvalidDataError(
                f"{self.source} has no usable row ({self.rows} rows, {self.invalid_rows} invalid)."
            )


def check_data(
    path: str | Path,
    processor: Any = None,
    max_length: int | None = None,
    loss_on: str = "assistant",
    workers: int | None = None,
    batch_size: int = 16,
) -> DataReport:
    """Check every row of `path`; see the module docstring for what each pass catches."""
    if loss_on not in ("assistant", "all"):
        raise VlmtuneError(f"loss_on must be assistant or all (got {loss_on!r}).")
    report = DataReport(source=str(path), max_length=max_length)
    errors_by_row: dict[str, list[RowError]] = {}
    parsed: list[Sample] = []
    order: list[str] = []
    for raw in read_rows(path):
        report.rows += 1
        order.append(raw.where)
        sample, errors = parse_row(raw)
        if errors:
            errors_by_row[raw.where] = errors
        elif sample is not None:
            parsed.append(sample)

    _check_images(parsed, errors_by_row, workers)
    valid = [s for s in parsed if s.where not in errors_by_row]
    if processor is not None and valid:
        _check_tokens(valid, processor, max_length, loss_on, errors_by_row, report, batch_size)
        valid = [s for s in valid if s.where not in errors_by_row]
    report.samples = valid
    report.invalid_rows = len(errors_by_row)
    report.errors = [e for where in order for e in errors_by_row.get(where, [])]
    return report


def _check_images(
    samples: list[Sample], errors_by_row: dict[str, list[RowError]], workers: int | None
) -> None:
    unique = list(dict.fromkeys(src for s in samples for src in s.images))
    if not unique:
        return
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = dict(zip(unique, pool.map(image_problem, unique), strict=True))
    for sample in samples:
        for i, src in enumerate(sample.images):
            problem = problems[src]
            if problem is not None:
                code, reason = problem
                errors_by_row.setdefault(sample.where, []).append(
                    RowError(sample.where, code, f"image {i}: {reason}")
                )


def _check_tokens(
    samples: list[Sample],
    processor: Any,
    max_length: int | None,
    loss_on: str,
    errors_by_row: dict[str, list[RowError]],
    report: DataReport,
    batch_size: int,
) -> None:
    from .collate import IGNORE_INDEX, Collator, Item

    collator = Collator(processor, loss_on=loss_on)

    def measure(batch: list[Sample]) -> None:
        items = [Item(i, 0, s) for i, s in enumerate(batch)]
        out = collator.encode(batch, [collator.load_images(it) for it in items])
        lengths = out["attention_mask"].sum(dim=1).tolist()
        for row, sample in enumerate(batch):
            n = int(lengths[row])
            ids = out["input_ids"][row, :n]
            labels = out["labels"][row, :n]
            report.tokens += n
            report.lengths[sample.where] = n
            report.longest = max(report.longest, n)
            supervised = (labels != IGNORE_INDEX).nonzero().flatten()
            if len(supervised) == 0:
                _add(errors_by_row, sample, "no_supervised_tokens", "no token of this row is supervised.")
                continue
            if max_length is None or n <= max_length:
                continue
            image_positions = (
                (ids == collator.image_token_id).nonzero().flatten()
                if collator.image_token_id is not None
                else []
            )
            if len(image_positions) and int(image_positions[-1]) >= max_length:
                _add(
                    errors_by_row,
                    sample,
                    "too_long",
                    f"the row is {n} tokens and max_length={max_length} would cut its image tokens; raise "
                    "max_length, lower max_pixels, or shorten the row.",
                )
            elif int(supervised[0]) >= max_length:
                _add(
                    errors_by_row,
                    sample,
                    "too_long",
                    f"the row is {n} tokens and max_length={max_length} would cut every assistant token; raise "
                    "max_length or shorten the row.",
                )
            else:
                report.truncated_rows += 1

    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        try:
            measure(batch)
        except VlmtuneError:
            for sample in batch:  # find the row(s) the processor rejects
                try:
                    measure([sample])
                except VlmtuneError as exc:
                    cause = exc.__cause__ or exc
                    _add(
                        errors_by_row,
                        sample,
                        "processor_error",
                        f"the processor rejects this row ({type(cause).__name__}: {cause}).",
                    )


def _add(errors_by_row: dict[str, list[RowError]], sample: Sample, code: str, message: str) -> None:
    errors_by_row.setdefault(sample.where, []).append(RowError(sample.where, code, message))


def processor_for(model: str | Path) -> Any:
    """The processor of a base model (folder or hub id), as training loads it."""
    from transformers import AutoProcessor

    from ..checkpoint import read_config, resolve

    folder = resolve(model)
    read_config(folder)  # a damaged config or processor/tokenizer config: one line, not a loader traceback
    return AutoProcessor.from_pretrained(folder)


def render(report: DataReport, show: int | None = None, echo: Callable[[str], None] = print) -> None:
    """Print every error (or the first `show`) and the summary."""
    errors = report.errors if show is None else report.errors[:show]
    for error in errors:
        echo(str(error))
    if show is not None and len(report.errors) > show:
        echo(f"... and {len(report.errors) - show} more")
    echo(report.summary())
