"""The family registry: every piece of model-family knowledge in vlmtune lives under this package."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import llava, mllama, qwen2_5_vl, qwen2_vl
from .base import DECODER_LINEAR_LEAVES, ROLES, Family, UnsupportedModelError, apply_renames, tied_embeddings

FAMILIES: dict[str, Family] = {
    f.name: f for f in (qwen2_vl.FAMILY, qwen2_5_vl.FAMILY, llava.FAMILY, mllama.FAMILY)
}

__all__ = [
    "DECODER_LINEAR_LEAVES",
    "FAMILIES",
    "ROLES",
    "Family",
    "UnsupportedModelError",
    "apply_renames",
    "detect",
    "get",
    "tied_embeddings",
]


def get(name: str) -> Family:
    """The family called `name` (as `vlmtune tiny` and configs spell it)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown model family {name!r}; supported families: {', '.join(FAMILIES)}."
        ) from None


def detect(config: Mapping[str, Any] | Any) -> Family:
    """The family of a model config (a `config.json` dict or a transformers config object)."""
    model_type = (
        config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    )
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; vlmtune supports: {', '.join(FAMILIES)}."
    )
