"""Dividing checked rows: the held-out eval split, and which rows may share a batch.

Both are data rules, not training steps: `vlmtune train` applies them after the row check, and anything
else that builds batches (a benchmark, `--check`) gets the same answer from here.
"""

from __future__ import annotations

import random
from dataclasses import replace

from ..errors import VlmtuneError
from ..families import Family
from .check import DataReport


def split_eval(train: DataReport, fraction: float, seed: int) -> tuple[DataReport, DataReport]:
    """Hold out `fraction` of the valid rows (at least one), chosen by `seed`; rows keep their file order.

    Returns (train, eval); the train report keeps its row counts and loses the held-out samples."""
    samples = list(train.samples)
    random.Random(seed).shuffle(samples)
    n_eval = max(1, round(len(samples) * fraction))
    if n_eval >= len(samples):
        raise VlmtuneError(f"data.eval_split={fraction} leaves no training rows of {len(samples)}.")
    held = {s.where for s in samples[:n_eval]}
    evaluation = DataReport(
        source=f"{train.source} (eval_split)",
        rows=n_eval,
        samples=[s for s in train.samples if s.where in held],
        lengths={w: n for w, n in train.lengths.items() if w in held},
    )
    return replace(train, samples=[s for s in train.samples if s.where not in held]), evaluation


def require_batchable(report: DataReport, family: Family, one_row_batches: bool) -> None:
    """Refuse a source whose rows the family's processor cannot put into one batch (text-only rows next
    to rows with images, for processors that cannot mix them); batches of one row always work."""
    if family.mixed_image_batches or one_row_batches:
        return
    text_only = [s for s in report.samples if not s.images]
    if text_only and len(text_only) < len(report.samples):
        raise VlmtuneError(
            f"{family.name}'s processor cannot batch rows without images with rows that have images, and "
            f"{report.source} mixes them ({len(text_only)} text-only, e.g. {text_only[0].where}); set "
            "batch_size: 1 or move the text-only rows to their own run."
        )
