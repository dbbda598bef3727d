"""Planned batches: rows grouped by length (`group_by_length`) or filled to a token budget
(`max_tokens_per_batch`), for padded and packed runs.

The plan is made once from the rows' token lengths (measured by `vlmtune data check` before training) and
the seed; the Trainer then sees one dataset item per planned batch (batch size 1) and shuffles their order
every epoch with its own seeded sampler, so resume and multi-process sharding work on whole batches.
Length grouping reuses transformers' `get_length_grouped_indices` (megabatches sorted by length).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ..errors import VlmtuneError
from .collate import Item, SampleDataset


def batch_cost(lengths: Sequence[int], packed: bool) -> int:
    """Token positions a batch occupies: the sum of its rows when packed, rows × longest when padded."""
    return sum(lengths) if packed else len(lengths) * max(lengths, default=0)


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    group_by_length: bool = False,
    max_tokens: int | None = None,
    packed: bool = False,
) -> list[list[int]]:
    """Row indices of each batch. With `max_tokens`, each batch takes rows in order while its cost stays
    within the budget (`batch_size` is then not used); otherwise `batch_size` rows each."""
    n = len(lengths)
    if max_tokens is not None and lengths and max(lengths) > max_tokens:
        longest = max(range(n), key=lengths.__getitem__)
        raise VlmtuneError(
            f"max_tokens_per_batch={max_tokens} is smaller than the longest row ({lengths[longest]} tokens); "
            "raise max_tokens_per_batch or set max_length."
        )
    if group_by_length:
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        group = batch_size
        if max_tokens is not None:  # megabatch size from the typical batch the budget allows
            typical = sorted(lengths)[n // 2] if n else 1
            group = max(1, max_tokens // max(1, typical))
        order = get_length_grouped_indices(
            list(lengths), group, generator=torch.Generator().manual_seed(seed)
        )
    else:
        order = list(range(n))
        random.Random(seed).shuffle(order)
    if max_tokens is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and batch_cost([lengths[i] for i in [*current, index]], packed) > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class BatchDataset:
    """One item per planned batch: the list of its rows' Items (the collators flatten it)."""

    def __init__(self, dataset: SampleDataset, batches: Sequence[Sequence[int]]) -> None:
        self.dataset = dataset
        self.batches = [list(b) for b in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[Item]:
        return [self.dataset[i] for i in self.batches[index]]

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.batches)


def padding_stats(batches: Sequence[Sequence[int]], lengths: Sequence[int], packed: bool) -> dict[str, Any]:
    """Rows, real tokens, occupied positions and the padding ratio of a plan (what `bench/` and logs print)."""
    real = sum(lengths[i] for b in batches for i in b)
    positions = sum(batch_cost([lengths[i] for i in b], packed) for b in batches)
    return {
        "batches": len(batches),
        "real_tokens": real,
        "positions": positions,
        "padding_ratio": round(1 - real / positions, 4) if positions else 0.0,
    }
