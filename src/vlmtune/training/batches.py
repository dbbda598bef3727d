"""How the run's rows become batches: packed or padded (`packing`), and planned batches
(`group_by_length`, `max_tokens_per_batch`); the collator for either."""

from __future__ import annotations

import logging
from typing import Any

from .. import families
from ..config import TrainConfig
from ..data import DataReport

log = logging.getLogger("vlmtune.train")


def choose_packing(cfg: TrainConfig, family: families.Family, model: Any) -> bool:
    """Whether batches are packed (`packing: on` without an exact path raises before anything is written)."""
    from ..data.packing import choose

    choice = choose(cfg.packing, family, model.config)
    (log.warning if cfg.packing == "auto" and not choice.packed else log.info)("%s", choice.message)
    return choice.packed


def make_collator(cfg: TrainConfig, processor: Any, family: families.Family, model: Any, packed: bool) -> Any:
    from ..data.collate import Collator
    from ..data.packing import PackedCollator, positions_for

    options: dict[str, Any] = {
        "loss_on": cfg.data.loss_on,
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        "supervised_logits_only": True,
    }
    if packed:
        return PackedCollator(processor, positions_for(family, model.config), **options)
    return Collator(processor, **options)


def planned_batches(cfg: TrainConfig, dataset: Any, report: DataReport, packed: bool) -> tuple[Any, int]:
    """The dataset the Trainer iterates and its batch size: rows (batch_size each), or with
    group_by_length / max_tokens_per_batch one item per planned batch (see vlmtune.data.batching)."""
    from ..data.batching import BatchDataset, padding_stats, plan_batches

    if not (cfg.group_by_length or cfg.max_tokens_per_batch):
        return dataset, cfg.batch_size
    cap = cfg.max_length or float("inf")
    lengths = [int(min(report.lengths[s.where], cap)) for s in dataset.samples]
    batches = plan_batches(
        lengths, cfg.batch_size, cfg.seed, cfg.group_by_length, cfg.max_tokens_per_batch, packed
    )
    stats = padding_stats(batches, lengths, packed)
    log.info(
        "planned %d batches of %d rows (%s); padding ratio of the plan %.3f",
        stats["batches"],
        len(lengths),
        "grouped by length" if cfg.group_by_length else f"<= {cfg.max_tokens_per_batch} tokens each",
        stats["padding_ratio"],
    )
    return BatchDataset(dataset, batches), 1
