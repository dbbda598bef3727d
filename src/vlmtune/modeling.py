"""Model structure from a config alone: the module tree on the meta device (no weights, no memory)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import families


@dataclass(frozen=True)
class LinearLayer:
    name: str
    role: str | None
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


def meta_model(config: dict[str, Any]) -> Any:
    """Instantiate the model class of `config` on the meta device: every module, no storage."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    raw = dict(config)
    model_type = raw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **raw)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(cfg)


def linear_layers(model: Any, family: families.Family) -> list[LinearLayer]:
    import torch

    return [
        LinearLayer(name, family.role_of(name), m.in_features, m.out_features, m.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]


def params_by_role(model: Any, family: families.Family) -> dict[str, int]:
    """Parameter counts per role; tied parameters count once (under the role that owns them first)."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():  # named_parameters() already skips tied duplicates
        role = family.role_of(name) or "other"
        counts[role] = counts.get(role, 0) + p.numel()
    return counts
