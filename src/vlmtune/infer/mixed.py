"""Mixed-adapter batches in two matmuls per layer, whatever the number of adapters.

PEFT's mixed-batch forward loops over the adapters of a batch in every LoRA layer (select rows, two small
matmuls, scatter back): with 8 adapters that is ~40 small ops per layer and step, which on a small model
costs more than the batching saves. Here the LoRA factors of the batch's adapters are concatenated once per
batch, `A_cat` (sum of ranks x in) and `B_cat` (out x sum of ranks, scaling folded in), and each row keeps
only its own adapter's slice of `x @ A_cat.T` through a 0/1 mask before `@ B_cat.T` (the idea of
Punica/S-LoRA's segmented kernels, with plain matmuls). The math per row is PEFT's:
`lora_B(lora_A(x)) * scaling` (+ `lora_B.bias * scaling` with lora_bias).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def plain_linear(layer: Any, adapters: set[str]) -> bool:
    """Whether every adapter of `adapters` in this PEFT LoRA layer is plain LoRA on a Linear (no DoRA or other
    variant, no embedding/conv factors), so `LinearStack` computes exactly what PEFT would."""
    for name in adapters:
        if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
            return False
        if not isinstance(layer.lora_A[name], torch.nn.Linear) or not isinstance(
            layer.lora_B[name], torch.nn.Linear
        ):
            return False
        dropout = layer.lora_dropout[name]
        if not isinstance(dropout, torch.nn.Identity) and dropout.training:
            return False
    return True


class LinearStack:
    """The LoRA deltas of one layer for a batch whose rows use `row_adapters` (PEFT names; rows whose
    adapter is not in this layer, or `__base__`, get no delta)."""

    def __init__(self, layer: Any, row_adapters: Sequence[str], present: set[str]) -> None:
        names = sorted(present)
        first = layer.lora_A[names[0]].weight
        self.dtype = first.dtype
        a_parts, b_parts, biases, spans = [], [], [], []
        start = 0
        for name in names:
            a = layer.lora_A[name].weight
            b = layer.lora_B[name].weight
            scaling = layer.scaling[name]
            a_parts.append(a.to(self.dtype))
            b_parts.append(b.to(self.dtype) * scaling)
            bias = layer.lora_B[name].bias
            biases.append(None if bias is None else bias.to(self.dtype) * scaling)
            spans.append((start, start + a.shape[0]))
            start += a.shape[0]
        self.a_cat = torch.cat(a_parts, dim=0)  # (K, in)
        self.b_cat = torch.cat(b_parts, dim=1)  # (out, K)
        index = {name: i for i, name in enumerate(names)}
        rows = len(row_adapters)
        mask = torch.zeros(rows, start, dtype=self.dtype, device=first.device)
        bias_rows = None
        if any(b is not None for b in biases):
            bias_rows = torch.zeros(rows, self.b_cat.shape[0], dtype=self.dtype, device=first.device)
        for row, adapter in enumerate(row_adapters):
            k = index.get(adapter)
            if k is None:
                continue
            lo, hi = spans[k]
            mask[row, lo:hi] = 1
            if bias_rows is not None and biases[k] is not None:
                bias_rows[row] = biases[k]
        self.mask = mask
        self.bias_rows = bias_rows

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The per-row LoRA output for input `x` (rows, ..., in), in the factors' dtype."""
        x = x.to(self.dtype)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        low = (x @ self.a_cat.T) * self.mask.view(shape)
        out = low @ self.b_cat.T
        if self.bias_rows is not None:
            out = out + self.bias_rows.view(shape)
        return out
