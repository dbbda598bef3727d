"""How the run's rows become batches: packed or padded (`packing`), and planned batches
(`group_by_length`, `max_tokens_per_batch`); the collator for either."""

from __future__ import annotations

import logging
from typing import Any

from .. import families
from ..config import TrainConfig
from ..data import DataReport

log = logging.getLogger("vlmtune.train")


def choose_packing(
    cfg: TrainConfig, family: families.Family, model: Any, train: DataReport, rows_per_batch: int
) -> bool:
    """Whether batches are packed (`packing: on` without an exact path raises before anything is written).
    `auto` weighs the padding that batches of `rows_per_batch` random rows of the run would carry (token
    budgets plan their own batches: not weighed)."""
    from ..data.batching import padding_stats, plan_batches
    from ..data.packing import choose

    padding = None
    if not cfg.max_tokens_per_batch and train.lengths:
        cap = cfg.max_length or max(train.lengths.values())
        lengths = [min(n, cap) for n in train.lengths.values()]
        padded = plan_batches(
            lengths, max(1, rows_per_batch), cfg.seed
        )  # random batches, as the sampler draws
        padding = padding_stats(padded, lengths, packed=False)["padding_ratio"]
    choice = choose(cfg.packing, family, model.config, padding)
    (log.warning if choice.fallback else log.info)("%s", choice.message)
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


def planned_batches(
    cfg: TrainConfig, dataset: Any, report: DataReport, packed: bool
) -> tuple[Any, int | None]:
    """The dataset the Trainer iterates and the rows per item it takes: rows (None: batch_size split over the
    processes), or with group_by_length / max_tokens_per_batch one item per planned batch (1)."""
    from ..data.batching import BatchDataset, padding_stats, plan_batches

    if not (cfg.group_by_length or cfg.max_tokens_per_batch):
        return dataset, None
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


DUMMY_WHERE = "(vlmtune: the image row added to a batch without images; it carries no loss)"
# Batch key (popped by VlmTrainer before the forward): 1 when the batch has a real image, 0 when only ours.
REAL_IMAGES = "vlmtune_real_images"


class ImageInEveryBatch:
    """Multi-process runs: a batch without images gets one extra row, a tiny image with no text to learn.

    Every process then runs the vision tower and projector in every step, so each rank's forward uses the
    same modules: DDP gets a gradient for every trainable parameter (zero from this row), FSDP2 runs the
    same all-gathers on every rank, and a rank that drew only text rows cannot hang the others (LLaMA-Factory
    #5616/#5944; ms-swift runs a dummy image the same way). The row's labels are all ignored, so the loss
    and its normalisation are those of the real rows. In a step where no process had a real image, the
    parameters only this row reached (vision, projector) get no gradient (None, as in one process, not the
    row's zeros, which would still move Adam's momentum): `VlmTrainer` drops them before the optimizer step."""

    def __init__(self, collator: Any, packed: bool) -> None:
        from ..conversation import IMAGE, Conversation, Message
        from ..data.collate import Item
        from ..data.formats import Sample

        self.collator = collator
        self.packed = packed
        sample = Sample(Conversation((Message("user", (IMAGE,)),), (_grey_png(),)), where=DUMMY_WHERE)
        self.item = Item(index=-1, epoch=0, sample=sample)
        self.dummy_tokens = 0

    def __call__(self, items: Any) -> dict[str, Any]:
        import torch

        from ..data.collate import IGNORE_INDEX, add_logits_to_keep, flatten

        rows = flatten(items)
        if any(item.sample.images for item in rows):
            return {**self.collator(items), REAL_IMAGES: torch.ones(1)}
        batch = self.collator([*rows, self.item])
        batch[REAL_IMAGES] = torch.zeros(1)
        if self.packed:  # one row: the dummy's tokens are the last ones
            if not self.dummy_tokens:
                self.dummy_tokens = int(self.collator([self.item])["input_ids"].shape[1])
            batch["labels"][:, -self.dummy_tokens :] = IGNORE_INDEX
        else:
            batch["labels"][-1] = IGNORE_INDEX
        if "logits_to_keep" in batch:
            add_logits_to_keep(batch)
        return batch


def _grey_png(side: int = 56) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(out, format="PNG")
    return out.getvalue()
