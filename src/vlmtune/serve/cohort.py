"""Rows decoding together: one KV cache, one attention mask, per-row positions; rows join and leave.

This is the state continuous batching needs and `generate` keeps hidden: we run the model's own
`prepare_inputs_for_generation` / `_update_model_kwargs_for_generation` around each forward, exactly as
`generate` does, so every family's decode inputs (multi-row rotary positions with their per-row offsets,
cross-attention masks, token types) come from the model itself, and we only add what `generate` cannot:
merging two batches (left-pad the shorter, concatenate rows) and dropping rows (select, then cut columns
that are padding for every row left). A row's positions are its own (computed at its prefill), so what it
shares a forward with never changes its answer.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Hashable, Sequence
from typing import Any

import torch

# Model kwargs that grow with the sequence, as (batch dim, sequence dim). `position_ids` is kept as its
# last column only (the next one is the last + 1, as `generate` computes it).
GROWING = {
    "attention_mask": (0, 1),
    "token_type_ids": (0, 1),
    "mm_token_type_ids": (0, 1),
    "cross_attention_mask": (0, 1),
}
POSITIONS = "position_ids"


class CohortError(Exception):
    """The model's decode state is of a kind rows cannot be merged in (e.g. a sliding-window cache)."""


def pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def batch_dim(key: str, t: torch.Tensor) -> int:
    return t.dim() - 2 if key == POSITIONS else GROWING[key][0]


class Cohort:
    """`rows[i]` is the row object of batch row i (opaque here); `mix` is the class of adapters that may share
    a forward; `cache` and `kwargs` hold the batched decode state."""

    def __init__(self, cache: Any, kwargs: dict[str, torch.Tensor], rows: list[Any], mix: Hashable) -> None:
        for layer in cache.layers:
            if type(layer).__name__ != "DynamicLayer":
                raise CohortError(
                    f"the model's cache has {type(layer).__name__} layers; continuous batching needs plain "
                    "full-attention caches (DynamicLayer)."
                )
        self.cache = cache
        self.kwargs = kwargs
        self.rows = rows
        self.mix = mix

    @property
    def length(self) -> int:
        return int(self.kwargs["attention_mask"].shape[1])

    def _layer_kinds(self) -> list[Any]:
        """Per cache layer: 'grow' (one entry per token: self-attention), None (empty), or the fixed shape
        (cross-attention states, the same for every step)."""
        kinds: list[Any] = []
        for layer in self.cache.layers:
            if layer.keys is None or layer.keys.numel() == 0:
                kinds.append(None)
            elif layer.keys.shape[-2] == self.length - 1:
                kinds.append("grow")
            else:
                kinds.append(tuple(layer.keys.shape[1:]))
        return kinds

    def signature(self) -> Hashable:
        """Equal signatures: the cohorts can be merged (same adapters class, same fixed state shapes)."""
        shapes = []
        for key in sorted(self.kwargs):
            t = self.kwargs[key]
            dims = {batch_dim(key, t)} | ({GROWING[key][1]} if key in GROWING else set())
            shapes.append((key, tuple(s for i, s in enumerate(t.shape) if i not in dims)))
        return (self.mix, tuple(self._layer_kinds()), tuple(shapes))

    def merge(self, other: Cohort) -> None:
        """Append `other`'s rows (the caller checked `signature()` equality)."""
        kinds = self._layer_kinds()
        length = max(self.length, other.length)
        pad_self, pad_other = length - self.length, length - other.length
        for kind, mine, theirs in zip(kinds, self.cache.layers, other.cache.layers, strict=True):
            if kind is None:
                continue
            for attr in ("keys", "values"):
                a, b = getattr(mine, attr), getattr(theirs, attr)
                if kind == "grow":
                    a, b = pad_left(a, pad_self, -2), pad_left(b, pad_other, -2)
                setattr(mine, attr, torch.cat([a, b], dim=0))
        for key, a in self.kwargs.items():
            b = other.kwargs[key]
            if key in GROWING:
                seq = GROWING[key][1]
                a, b = pad_left(a, pad_self, seq), pad_left(b, pad_other, seq)
            self.kwargs[key] = torch.cat([a, b], dim=batch_dim(key, a))
        self.rows.extend(other.rows)

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only these rows (in this order), then drop columns that are padding for all of them."""
        if list(indices) == list(range(len(self.rows))):
            return
        kinds = self._layer_kinds()
        index = torch.tensor(list(indices), dtype=torch.long, device=self.kwargs["attention_mask"].device)
        for kind, layer in zip(kinds, self.cache.layers, strict=True):
            if kind is not None:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        for key, t in self.kwargs.items():
            self.kwargs[key] = t.index_select(batch_dim(key, t), index)
        self.rows = [self.rows[i] for i in indices]
        mask = self.kwargs["attention_mask"]
        if mask.shape[0] == 0:
            return
        used = mask.bool().any(dim=0).nonzero()
        cut = int(used[0]) if used.numel() else 0
        if cut:
            for kind, layer in zip(kinds, self.cache.layers, strict=True):
                if kind == "grow":
                    layer.keys = layer.keys[..., cut:, :].contiguous()
                    layer.values = layer.values[..., cut:, :].contiguous()
            for key in [k for k in self.kwargs if k in GROWING]:
                t = self.kwargs[key]
                self.kwargs[key] = t.narrow(GROWING[key][1], cut, t.shape[GROWING[key][1]] - cut).contiguous()

    def repeat(self, times: int) -> None:
        """Each row `times` times in a row (n choices of one prompt share its prefill)."""
        if times == 1:
            return
        for layer in self.cache.layers:
            if layer.keys is not None and layer.keys.numel():
                layer.keys = layer.keys.repeat_interleave(times, dim=0)
                layer.values = layer.values.repeat_interleave(times, dim=0)
        for key, t in self.kwargs.items():
            self.kwargs[key] = t.repeat_interleave(times, dim=batch_dim(key, t))
        self.rows = [row for row in self.rows for _ in range(times)]


@functools.cache
def accepts_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def forward_kwargs(model: Any) -> dict[str, Any]:
    """Keyword arguments `generate` adds to every step (through `prepare_inputs_for_generation`): logits
    for the last position only."""
    return {"logits_to_keep": 1} if accepts_logits_to_keep(type(model)) else {}


def prefill(model: Any, encoded: Any, rows: list[Any], mix: Hashable) -> tuple[torch.Tensor, Cohort]:
    """Run a prompt batch (processor output) and return (last-position logits, its cohort)."""
    kwargs = dict(encoded)
    input_ids = kwargs.pop("input_ids")
    kwargs[POSITIONS] = model._prepare_position_ids_for_generation(
        input_ids, {"input_ids": input_ids, **kwargs}
    )
    inputs = model.prepare_inputs_for_generation(
        input_ids, use_cache=True, is_first_iteration=True, **kwargs, **forward_kwargs(model)
    )
    out = model(**inputs)
    return out.logits[:, -1, :], Cohort(out.cache, advance(model, out, kwargs), rows, mix)


def decode(model: Any, cohort: Cohort, tokens: torch.Tensor) -> torch.Tensor:
    """One decode step for every row of `cohort` (`tokens`: the last token of each row, shape (rows,))."""
    inputs = model.prepare_inputs_for_generation(
        tokens.view(-1, 1),
        cache=cohort.cache,
        use_cache=True,
        is_first_iteration=False,
        next_sequence_length=1,
        **cohort.kwargs,
        **forward_kwargs(model),
    )
    out = model(**inputs)
    cohort.cache = out.cache
    cohort.kwargs = advance(model, out, cohort.kwargs)
    return out.logits[:, -1, :]


def advance(model: Any, out: Any, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's own update of its generation kwargs for one new token; only the growing ones are kept."""
    updated = model._update_model_kwargs_for_generation(out, dict(kwargs), is_encoder_decoder=False)
    kept = {k: v for k, v in updated.items() if k in GROWING and isinstance(v, torch.Tensor)}
    kept[POSITIONS] = updated[POSITIONS][..., -1:]
    return kept
