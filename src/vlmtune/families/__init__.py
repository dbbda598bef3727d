"""The family registry: every piece of model-family knowledge in vlmtune lives under this package.

Each family is a folder here (torchtune style): `<name>/__init__.py` exports `FAMILY` (its `Family`,
usually from `family.py`), `<name>/tiny.py` exports `TINY` (how `vlmtune tiny` builds it), and any
foreign adapter formats it reads live beside them. Folders are found at import: adding a family is adding a
folder, with no edit elsewhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .base import (
    DECODER_LINEAR_LEAVES,
    ROLES,
    TOKEN_ALIGNED_KEYS,
    Family,
    ForeignFormat,
    KeyTable,
    Rename,
    UnsupportedModelError,
    decoder_targets,
    tied_embeddings,
)
from .tiny_kit import TinySpec

FAMILIES: dict[str, Family] = {}
# The family `make demo` trains: a tiny one measured to learn the demo's task in ~30 s on 2 cores.
DEMO_FAMILY = "qwen2_vl"
# family name -> the package that defines it (its `tiny` module lives there), or its TinySpec itself.
_SOURCES: dict[str, str | TinySpec | None] = {}

__all__ = [
    "DECODER_LINEAR_LEAVES",
    "FAMILIES",
    "ROLES",
    "TOKEN_ALIGNED_KEYS",
    "Family",
    "ForeignFormat",
    "KeyTable",
    "Rename",
    "TinySpec",
    "UnsupportedModelError",
    "decoder_targets",
    "detect",
    "foreign_format",
    "get",
    "image_limit_keys",
    "register",
    "register_module",
    "scoped",
    "tied_embeddings",
    "tiny_spec",
    "token_aligned_keys",
]


def register(family: Family, tiny: str | TinySpec | None = None) -> Family:
    """Add a family; `tiny` is its TinySpec or the package whose `tiny` module holds `TINY`."""
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is registered twice.")
    claimed = {t: f.name for f in FAMILIES.values() for t in f.model_types}
    for model_type in family.model_types:
        if model_type in claimed:
            raise ValueError(
                f"model_type {model_type!r} belongs to both {claimed[model_type]} and {family.name}."
            )
    FAMILIES[family.name] = family
    _SOURCES[family.name] = tiny
    return family


def register_module(module_name: str) -> Family:
    """Import a family package (anything importable that exports `FAMILY`) and register it."""
    module = importlib.import_module(module_name)
    return register(module.FAMILY, tiny=module_name)


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.ispkg:
            register_module(f"{__name__}.{info.name}")


@contextmanager
def scoped(keep: bool = False) -> Iterator[dict[str, Family]]:
    """A temporary registry (tests): inside, `register` adds families that vanish on exit; with
    `keep=False` the built-in families are hidden meanwhile."""
    saved, saved_sources = dict(FAMILIES), dict(_SOURCES)
    if not keep:
        FAMILIES.clear()
        _SOURCES.clear()
    try:
        yield FAMILIES
    finally:
        FAMILIES.clear()
        FAMILIES.update(saved)
        _SOURCES.clear()
        _SOURCES.update(saved_sources)


def get(name: str) -> Family:
    """The family called `name` (as `vlmtune tiny` and configs spell it)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown model family {name!r}; supported families: {', '.join(FAMILIES)}."
        ) from None


def tiny_spec(name: str) -> TinySpec:
    """How `vlmtune tiny` builds family `name` (imported only when asked for)."""
    get(name)
    source = _SOURCES.get(name)
    if isinstance(source, TinySpec):
        return source
    if source is None:
        raise UnsupportedModelError(f"family {name!r} has no tiny checkpoint spec.")
    return importlib.import_module(f"{source}.tiny").TINY


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


def token_aligned_keys() -> tuple[str, ...]:
    """Every processor output key with one entry per token position, over all families (a batch holds
    only its own family's keys, so the union is what truncation must cut)."""
    keys = list(TOKEN_ALIGNED_KEYS)
    for family in FAMILIES.values():
        keys += [k for k in family.token_aligned_keys if k not in keys]
    return tuple(keys)


def image_limit_keys() -> tuple[str, ...]:
    """Every processor image-limit key some family declares (config spelling hints)."""
    return tuple(dict.fromkeys(k for f in FAMILIES.values() for k in f.image_limit_keys))


def foreign_format(folder: Path, folder_config: Mapping[str, Any]) -> tuple[Family, ForeignFormat] | None:
    """The family and foreign adapter format an adapter folder is written in (None: PEFT standard)."""
    for family in FAMILIES.values():
        for fmt in family.foreign_formats:
            if fmt.detect(folder, folder_config):
                return family, fmt
    return None


_discover()
