"""Padding-free packed batches: each sample is encoded on its own (chat template, processor, assistant-only
labels, truncation), then the samples are concatenated into one row — token tensors along the sequence,
pixel and grid/size tensors along dim 0 — with position ids that restart at every sample.

Isolation comes from transformers itself: with no `attention_mask` and no cache, its mask builders
(`masking_utils.find_packed_sequence_indices`, SDPA/eager/flex) turn position restarts into a block-causal
mask, and the flash-attention path turns them into varlen `cu_seq_lens` (`_is_packed_sequence`). Qwen-style
models take `[4, rows, L]` ids whose first row is the 1-D text position that marks the restarts; with only
the 3 rotary rows they silently attend across samples (transformers #38007). The family declares which
style it needs (`Family.packed_positions`); a family or attention kernel without an exact path is refused
for `packing: on` and padded for `auto` (`choose`); `auto` also pads rows of (nearly) one length, where
packing has no padding to remove (`MIN_PADDING`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import families
from ..errors import VlmtuneError
from .collate import IGNORE_INDEX, Collator, Item, add_logits_to_keep, flatten

# Attention implementations whose packed path transformers builds from position ids (block mask or varlen).
PACKABLE_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
# `auto` packs only when padded batches would be at least this much padding: packing encodes each sample on
# its own and SDPA still computes a packed row's whole (sum L)^2 attention, so rows of one length train
# slower packed (the demo's uniform rows: 1.45x slower on CPU; docs/benchmarks.md).
MIN_PADDING = 0.10


class PackingError(VlmtuneError, ValueError):
    """`packing: on` where the family or attention kernel has no exact packed path."""


@dataclass(frozen=True)
class PackingChoice:
    packed: bool
    message: str  # one line: what was chosen and why (logged once per run)
    fallback: bool = False  # `auto` padded because packing would not be exact (a warning, not a choice)


def unsupported_reason(family: Any, attention: str | None) -> str | None:
    """Why packed batches would not be exact for this family and attention kernel; None when they are."""
    if not family.packed_positions:
        return f"{family.name} has no exact packed path ({family.packing_unsupported})"
    if attention not in PACKABLE_ATTENTION:
        return (
            f"attention implementation {attention!r} is not one whose packed mask transformers builds from "
            f"position ids ({', '.join(PACKABLE_ATTENTION)})"
        )
    return None


def attention_of(model_config: Any) -> str | None:
    """The language model's attention implementation (the one that must keep samples apart)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text, "_attn_implementation", None) or getattr(model_config, "_attn_implementation", None)


def choose(mode: str, family: Any, model_config: Any, padding: float | None = None) -> PackingChoice:
    """Resolve `packing: auto|on|off` for a loaded model; `on` without an exact path is an error. `padding`:
    the share of padding padded batches of the run's rows would carry (`batching.padding_stats`); `auto` packs only
    from `MIN_PADDING` on."""
    if mode == "off":
        return PackingChoice(False, "packing: off; batches are padded.")
    attention = attention_of(model_config)
    reason = unsupported_reason(family, attention)
    if reason is None and mode == "auto" and padding is not None and padding < MIN_PADDING:
        return PackingChoice(
            False,
            f"packing: auto pads: padded batches of these rows are {padding:.0%} padding, under the "
            f"{MIN_PADDING:.0%} from which packing pays (packing: on packs anyway).",
        )
    if reason is None:
        return PackingChoice(
            True,
            f"packing: {mode}; batches are packed without padding ({family.name}: "
            f"{family.packed_positions} position ids, {attention} attention keeps samples apart).",
        )
    if mode == "on":
        raise PackingError(f"packing: on, but {reason}; set packing: auto (pads instead) or packing: off.")
    return PackingChoice(False, f"packing: auto falls back to padded batches: {reason}.", fallback=True)


# -- position ids -------------------------------------------------------------------------------------------


class TextPositions:
    """Plain 1-D positions 0..L-1 for one sample: `[1, L]`."""

    def __call__(self, sample: dict[str, Any]) -> Any:
        import torch

        return torch.arange(sample["input_ids"].shape[1]).unsqueeze(0)


class _Weightless:
    """A model class's methods bound to its config alone: `get_rope_index` reads only `self.config` and
    sibling helpers, so the collator (possibly in a DataLoader worker) needs no weights to call it."""

    def __init__(self, model_class: type, config: Any) -> None:
        self._model_class = model_class
        self.config = config

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self._model_class, name)
        return value.__get__(self) if callable(value) and hasattr(value, "__get__") else value


class RopeIndexPositions:
    """Qwen-style multi-row rotary positions of one sample from the model's own `get_rope_index`, with the
    1-D text row first: `[4, 1, L]`."""

    def __init__(self, model_class_name: str, config: Any) -> None:
        import transformers

        model_class = getattr(transformers, model_class_name)
        self.model = _Weightless(model_class, config)
        accepted = inspect.signature(model_class.get_rope_index).parameters
        self.accepted = [k for k in accepted if k not in ("self", "kwargs", "attention_mask")]

    def __call__(self, sample: dict[str, Any]) -> Any:
        import torch

        ids = sample["input_ids"]
        text = torch.arange(ids.shape[1]).view(1, 1, -1)
        if "mm_token_type_ids" not in sample:  # no image or video: the rotary rows are the text row
            return text.expand(4, 1, -1)
        kwargs = {k: sample[k] for k in self.accepted if k in sample}
        rope, _ = self.model.get_rope_index(**kwargs)
        return torch.cat([text, rope.to(text.dtype)], dim=0)


def positions_for(family: Any, model_config: Any) -> Callable[[dict[str, Any]], Any]:
    """The position-id builder the family declares (see `Family.packed_positions`)."""
    if family.packed_positions == "1d":
        return TextPositions()
    if family.packed_positions == "rope_index":
        return RopeIndexPositions(family.rope_index_model, model_config)
    raise PackingError(f"{family.name} has no exact packed path ({family.packing_unsupported}).")


# -- the collator -------------------------------------------------------------------------------------------


class PackedCollator(Collator):
    """Collator that packs the batch's samples into one row (see the module docstring)."""

    def __init__(self, processor: Any, positions: Callable[[dict[str, Any]], Any], **kwargs: Any) -> None:
        super().__init__(processor, **kwargs)
        self.positions = positions

    def __call__(self, items: Sequence[Item] | Sequence[Sequence[Item]]) -> dict[str, Any]:
        return self.pack([self.rows([item]) for item in flatten(items)])

    def pack(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One packed row from single-sample processor batches (each without padding)."""
        import torch

        keys = list(dict.fromkeys(k for s in samples for k in s))
        token_aligned = families.token_aligned_keys()
        packed: dict[str, Any] = {}
        for key in keys:
            if key == "attention_mask":  # its absence is what makes transformers read the restarts
                continue
            values = [s[key] for s in samples if key in s]
            if key in token_aligned:
                if len(values) != len(samples):
                    raise ValueError(f"the processor returned {key!r} for some samples only")
                packed[key] = torch.cat(values, dim=1)
            else:
                packed[key] = torch.cat(values, dim=0)
        labels = [s["labels"].clone() for s in samples]
        for row in labels:
            # A sample's first token is never a target within its sample; across the boundary it would
            # become the target of the previous sample's last position.
            row[:, 0] = IGNORE_INDEX
        packed["labels"] = torch.cat(labels, dim=1)
        packed["position_ids"] = torch.cat([self.positions(s) for s in samples], dim=-1)
        packed["use_cache"] = False  # a cache would switch transformers' packed-mask detection off
        if self.supervised_logits_only:
            add_logits_to_keep(packed)
        return packed
