"""A few rows of a run's data as the model sees them: the images, the chat-templated text, and the tokens the
training collator produces, split into image-token spans, supervised (label) tokens and the rest, with
what `max_length` would cut. The rows go through `vlmtune.data.collate.Collator` (the one training uses)
with the run's processor settings, so what is shown is what was trained on."""

from __future__ import annotations

import base64
import io
import itertools
import threading
from pathlib import Path
from typing import Any

from ..data.collate import IGNORE_INDEX
from ..errors import VlmtuneError
from .runs import Run

THUMBNAIL = 256
_processors: dict[tuple[str, tuple], Any] = {}
_lock = threading.Lock()


def run_processor(cfg: Any) -> Any:
    """The processor the run trained with (the base's, with the run's image limits), cached per process."""
    from .. import checkpoint, families
    from ..training.recipe import image_limits, load_processor

    folder = checkpoint.resolve(cfg.model)
    family = families.detect(checkpoint.read_config(folder))
    limits = image_limits(cfg, family)
    key = (str(folder), tuple(sorted(limits.items())))
    with _lock:
        if key not in _processors:
            _processors[key] = load_processor(folder, limits)
        return _processors[key]


def data_file(run: Run, cfg: Any, split: str) -> Path:
    source = {"train": cfg.data.train, "eval": cfg.data.eval}.get(split)
    if source is None:
        raise VlmtuneError(f"run {run.id} has no {split} data file (data.{split} is not set).")
    path = Path(source)
    if not path.is_absolute() and not path.exists():
        path = run.path / path
    if not path.exists():
        raise VlmtuneError(f"data.{split} of run {run.id} ({source}) no longer exists.")
    return path


def thumbnail(image: Any) -> str:
    img = image.copy()
    img.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def spans(
    tokens: list[str], ids: list[int], labels: list[int], image_id: int | None, max_length: int | None
) -> list[dict[str, Any]]:
    """Consecutive tokens of one kind (image | label | text) and one side of the max_length cut, joined."""
    out: list[dict[str, Any]] = []
    for i, (token, tid, label) in enumerate(zip(tokens, ids, labels, strict=True)):
        kind = "image" if tid == image_id else "label" if label != IGNORE_INDEX else "text"
        cut = max_length is not None and i >= max_length
        if out and out[-1]["kind"] == kind and out[-1]["cut"] == cut:
            out[-1]["count"] += 1
            if kind != "image":
                out[-1]["text"] += token
        else:
            out.append({"kind": kind, "cut": cut, "start": i, "count": 1, "text": token})
    return out


def render_rows(run: Run, split: str = "train", start: int = 0, count: int = 4) -> dict[str, Any]:
    from ..config import load_train_config
    from ..data.collate import Collator, Item
    from ..data.formats import parse_row, read_rows, to_messages

    cfg = load_train_config(run.path / "config.yaml")
    path = data_file(run, cfg, split)
    processor = run_processor(cfg)
    collator = Collator(processor, loss_on=cfg.data.loss_on, max_length=None, seed=cfg.seed)
    tokenizer = processor.tokenizer
    rows = []
    for index, raw in enumerate(itertools.islice(read_rows(path), start, start + count), start):
        sample, errors = parse_row(raw)
        entry: dict[str, Any] = {"index": index, "where": raw.where, "errors": [str(e) for e in errors]}
        rows.append(entry)
        if sample is None:
            continue
        try:
            images = collator.load_images(Item(index, 0, sample))
            batch = collator.encode([sample], [images])
        except Exception as exc:  # a bad image or a processor refusal is what this view is for: show it
            entry["errors"].append(f"{type(exc).__name__}: {exc}")
            continue
        ids = batch["input_ids"][0].tolist()
        labels = batch["labels"][0].tolist()
        pieces = [tokenizer.decode([t]) for t in ids]
        image_id = collator.image_token_id
        supervised = sum(1 for label in labels if label != IGNORE_INDEX)
        warnings = []
        limit = cfg.max_length
        if limit is not None and len(ids) > limit:
            lost = sum(1 for label in labels[limit:] if label != IGNORE_INDEX)
            image_cut = image_id is not None and image_id in ids[limit:]
            warnings.append(
                f"{len(ids)} tokens > max_length={limit}: the last {len(ids) - limit} are cut"
                + (f", {lost} of {supervised} supervised tokens with them" if lost else "")
                + ("; image tokens would be cut, so training refuses this row" if image_cut else "")
            )
        if supervised == 0:
            warnings.append("no supervised token: this row teaches nothing")
        entry.update(
            images=[{"src": thumbnail(img), "width": img.width, "height": img.height} for img in images],
            template=processor.apply_chat_template(to_messages(sample), tokenize=False),
            tokens=len(ids),
            supervised=supervised,
            image_tokens=sum(1 for t in ids if t == image_id),
            spans=spans(pieces, ids, labels, image_id, limit),
            warnings=warnings,
        )
    return {
        "run": run.id,
        "split": split,
        "file": str(path),
        "start": start,
        "max_length": cfg.max_length,
        "loss_on": cfg.data.loss_on,
        "image_token": getattr(processor, "image_token", None),
        "rows": rows,
    }
