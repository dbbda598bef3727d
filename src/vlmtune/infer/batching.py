"""Which requests may share one forward pass (pure Python, no torch).

Rows can share a batch when they use the same processor (same chat template and image settings), when
the family's processor can batch them (Mllama's cannot put image rows and text-only rows together), and
when their
adapters can be mixed: PEFT's `adapter_names=` routes each *row* of a batch through its adapter, which is
only right for layers that see one row per batch entry (the language model). Adapters with LoRA or fully
trained modules in the vision tower or projector (whose inputs are patches or images, not rows) and DoRA
adapters (PEFT cannot mix them) run one adapter per forward instead; results are the same either way.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import VlmtuneError
from .types import BASE


@dataclass(frozen=True)
class Row:
    """What the planner needs to know about one request."""

    index: int
    adapter: str
    processor: str  # key of the processor the row is rendered with
    has_images: bool  # only set where image rows and text-only rows must batch apart


def mix_class(adapter: str, mixable: bool) -> Hashable:
    """Adapters with equal classes may share a forward; adapters that cannot mix get a class of their own."""
    return "mix" if mixable else ("solo", adapter)


def plan(rows: Sequence[Row], classes: dict[str, Hashable], batch_size: int) -> list[list[int]]:
    """Batches (lists of row indices) covering every row once. `classes[name]` is the mix class of each
    adapter; base rows join the first mixable batch of their kind, or form their own."""
    if batch_size < 1:
        raise VlmtuneError(f"batch size must be at least 1 (got {batch_size}).")
    buckets: dict[tuple[str, bool, Hashable], list[int]] = {}
    base_rows: dict[tuple[str, bool], list[int]] = {}
    for row in rows:
        kind = (row.processor, row.has_images)
        if row.adapter == BASE:
            base_rows.setdefault(kind, []).append(row.index)
        else:
            buckets.setdefault((*kind, classes[row.adapter]), []).append(row.index)
    for kind, indices in base_rows.items():
        host = next((key for key in buckets if key[:2] == kind and key[2] == "mix"), None)
        if host is None:
            buckets[(*kind, ("solo", BASE))] = indices
        else:
            buckets[host] = sorted(buckets[host] + indices)
    return [chunk for indices in buckets.values() for chunk in chunks(indices, batch_size)]


def chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
