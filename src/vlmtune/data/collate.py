"""Batches for training: chat template + processor (which expands image placeholders), and labels that
supervise the assistant turns only.

Labels come from the chat template's `{% generation %}` markers when it has them (transformers'
`return_assistant_tokens_mask`). Real checkpoints' templates often lack them; then each assistant turn's
span is found by rendering the conversation up to the turn (with the generation prompt) and up to its
end, tokenizing both with the processor, and checking that both are token prefixes of the full sequence.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import families
from ..errors import VlmtuneError
from .formats import Sample, to_messages
from .images import augment, open_image

IGNORE_INDEX = -100
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(VlmtuneError, ValueError):
    """The chat template renders conversations in a way assistant-only labels cannot be derived from."""


def has_generation_markers(processor: Any) -> bool:
    template = getattr(processor, "chat_template", None) or ""
    return bool(GENERATION_MARKER.search(template if isinstance(template, str) else str(template)))


@dataclass(frozen=True)
class Item:
    """What the dataset hands the collator: the sample, whether to augment it, and what seeds that."""

    index: int
    epoch: int
    sample: Sample
    augment: bool = False


class SampleDataset:
    """A list of validated samples as a torch-style map dataset. `augment` is set on the training set only;
    `epoch` is set by a trainer callback, so augmentation is a function of (seed, epoch, index), which
    survives resume and worker processes."""

    def __init__(self, samples: Sequence[Sample], augment: bool = False) -> None:
        self.samples = list(samples)
        self.augment = augment
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        return Item(index, self.epoch, self.samples[index], self.augment)


class Collator:
    """Turns Items into model inputs with `labels` (-100 where no loss is taken)."""

    def __init__(
        self,
        processor: Any,
        loss_on: str = "assistant",
        max_length: int | None = None,
        seed: int = 0,
        supervised_logits_only: bool = False,
    ) -> None:
        self.processor = processor
        self.loss_on = loss_on
        self.max_length = max_length
        self.seed = seed
        # Add `logits_to_keep`: the model then projects onto the vocabulary only where a label follows
        # (see vlmtune.training.loss); the full (batch, length, vocab) logits are never built.
        self.supervised_logits_only = supervised_logits_only
        self.use_markers = has_generation_markers(processor)
        self.image_token_id = _image_token_id(processor)

    def __call__(self, items: Sequence[Item] | Sequence[Sequence[Item]]) -> dict[str, Any]:
        batch = self.rows(flatten(items))
        if self.supervised_logits_only:
            add_logits_to_keep(batch)
        return batch

    def rows(self, items: Sequence[Item]) -> dict[str, Any]:
        """The padded processor batch of `items` with labels, truncated to max_length."""
        samples = [item.sample for item in items]
        images = [self.load_images(item) for item in items]
        batch = self.encode(samples, images)
        if self.max_length is not None:
            batch = self.truncate(batch, samples)
        return batch

    def load_images(self, item: Item) -> list[Any]:
        images = [open_image(src) for src in item.sample.images]
        if item.augment and images:
            rng = random.Random(f"{self.seed}:{item.epoch}:{item.index}")
            images = [augment(img, rng) for img in images]
        return images

    # -- encoding ---------------------------------------------------------------------------------------
    def encode(self, samples: Sequence[Sample], images: Sequence[list[Any]]) -> dict[str, Any]:
        """Processor outputs plus `labels` for a batch (no truncation)."""
        from transformers import BatchFeature

        conversations = [to_messages(s) for s in samples]
        kwargs: dict[str, Any] = {"padding": True}
        if any(images):
            kwargs["images"] = [list(imgs) for imgs in images]
        try:
            out = self.processor.apply_chat_template(
                conversations,
                tokenize=True,
                return_dict=True,
                # NumPy, converted below: transformers' assistant-mask pass walks the offset mapping token by
                # token, and on torch tensors that walk made encoding ~2x slower (outputs are equal).
                return_tensors="np",
                return_assistant_tokens_mask=self.use_markers and self.loss_on == "assistant",
                processor_kwargs=kwargs,
            )
            out = BatchFeature(dict(out), tensor_type="pt")
        except Exception as exc:
            rows = ", ".join(s.where for s in samples)
            raise VlmtuneError(
                f"the processor failed on the batch of {rows} ({type(exc).__name__}: {exc}); "
                "run `vlmtune data check` on the file with --model to find the row."
            ) from exc
        batch = dict(out)
        input_ids = batch["input_ids"]
        attention = batch["attention_mask"].bool()
        if self.loss_on == "all":
            keep = attention.clone()
            if self.image_token_id is not None:
                keep &= input_ids != self.image_token_id
        elif self.use_markers:
            keep = batch.pop("assistant_masks").bool() & attention
        else:
            keep = self._prefix_masks(conversations, images, input_ids, attention)
        batch["labels"] = input_ids.masked_fill(~keep, IGNORE_INDEX)
        return batch

    def _prefix_masks(
        self, conversations: list[list[dict]], images: Sequence[list[Any]], input_ids: Any, attention: Any
    ) -> Any:
        import torch

        keep = torch.zeros_like(attention)
        for row, (messages, imgs) in enumerate(zip(conversations, images, strict=True)):
            full = input_ids[row][attention[row]].tolist()
            start_col = int(attention[row].nonzero()[0]) if attention[row].any() else 0
            for start, end in assistant_spans(self.processor, messages, imgs, full):
                keep[row, start_col + start : start_col + end] = True
        return keep

    # -- truncation -------------------------------------------------------------------------------------
    def truncate(self, batch: dict[str, Any], samples: Sequence[Sample]) -> dict[str, Any]:
        limit = self.max_length
        if batch["input_ids"].shape[1] <= limit:
            return batch
        if self.image_token_id is not None:
            cut = batch["input_ids"][:, limit:] == self.image_token_id
            if bool(cut.any()):
                rows = [samples[i].where for i in cut.any(dim=1).nonzero().flatten().tolist()]
                raise VlmtuneError(
                    f"max_length={limit} would cut image tokens of {', '.join(rows)}; raise max_length or "
                    "lower max_pixels (training checks lengths first, so this means the data changed)."
                )
        # Processor outputs with one entry per token position (batch, seq, ...), as the families declare them.
        for key in families.token_aligned_keys():
            if key in batch:
                batch[key] = batch[key][:, :limit]
        return batch


def flatten(items: Sequence[Item] | Sequence[Sequence[Item]]) -> list[Item]:
    """Items as the DataLoader hands them: one per row, or (from a planned-batch dataset, see
    vlmtune.data.batching) one list of items per planned batch."""
    return [it for entry in items for it in (entry if isinstance(entry, (list, tuple)) else [entry])]


def add_logits_to_keep(batch: dict[str, Any]) -> None:
    """`logits_to_keep`: the positions whose next token is supervised (see vlmtune.training.loss)."""
    keep = batch["labels"] != IGNORE_INDEX
    batch["logits_to_keep"] = keep.roll(-1, dims=1)
    batch["logits_to_keep"][:, -1] = False


def assistant_spans(
    processor: Any, messages: list[dict], images: list[Any], full: list[int]
) -> list[tuple[int, int]]:
    """Token spans [start, end) of each assistant turn within `full` (the tokenized conversation), by
    rendering prefixes. The span covers the turn's text and its end-of-turn token(s); trailing tokens that
    decode to whitespace only (the template's newline between turns) are left out."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        n_images = sum(1 for m in messages[:i] for part in m["content"] if part.get("type") == "image")
        prompt = _token_ids(processor, messages[:i], images[:n_images], add_generation_prompt=True)
        through = _token_ids(processor, messages[: i + 1], images[:n_images], add_generation_prompt=False)
        for ids, what in ((prompt, "the prompt before"), (through, "the conversation up to the end of")):
            if full[: len(ids)] != ids:
                raise TemplateError(
                    f"the chat template renders {what} assistant turn {i} differently from the whole "
                    "conversation, so assistant tokens cannot be located; add {% generation %} / "
                    "{% endgeneration %} around assistant content in the template, or set data.loss_on: all."
                )
        end = len(through)
        while end > len(prompt) and not processor.tokenizer.decode(through[end - 1 : end]).strip():
            end -= 1
        spans.append((len(prompt), end))
    return spans


def _token_ids(
    processor: Any, messages: list[dict], images: list[Any], add_generation_prompt: bool
) -> list[int]:
    text = processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    bos = getattr(processor.tokenizer, "bos_token", None)
    kwargs: dict[str, Any] = {"add_special_tokens": not (bos and text.startswith(bos))}
    if images:
        kwargs["images"] = [list(images)]
    out = processor(text=[text], **kwargs)
    return list(out["input_ids"][0])


def _image_token_id(processor: Any) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None):
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token_id
