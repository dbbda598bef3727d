"""Adapter names: `--adapter NAME=DIR` / `DIR` specs, names taken from folders, and the rule a name obeys."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .types import BASE, InferenceError, canonical_adapter

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_name(name: str) -> None:
    """Adapter names are letters, digits, '_' and '-' (they appear in URLs, JSONL and PEFT module names)."""
    if not NAME_PATTERN.match(name) or canonical_adapter(name) == BASE:
        raise InferenceError(
            f"adapter name {name!r} is not usable: use letters, digits, '_' and '-' "
            f"({BASE} and 'none' are reserved for the base)."
        )


def name_adapters(adapters: Mapping[str, str | Path] | Sequence[str | Path] | None) -> dict[str, Path]:
    """Names for adapter folders: given ones, else the folder name (made a valid name)."""
    if adapters is None:
        return {}
    if isinstance(adapters, Mapping):
        return {str(k): Path(v) for k, v in adapters.items()}
    out: dict[str, Path] = {}
    for path in adapters:
        path = Path(path)
        name = re.sub(r"[^A-Za-z0-9_\-]", "_", path.resolve().name) or "adapter"
        if name in out:
            raise InferenceError(
                f"two adapters would both be called {name!r} ({out[name]} and {path}); name them: NAME=DIR."
            )
        out[name] = path
    return out


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`--adapter` values, `NAME=DIR` or `DIR` (named after the folder), to {name: folder}."""
    named: dict[str, Path] = {}
    unnamed: list[str] = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if sep and NAME_PATTERN.match(name) and folder:
            if name in named:
                raise InferenceError(f"--adapter {name}= is given twice; give each adapter its own name.")
            named[name] = Path(folder)
        else:
            unnamed.append(spec)
    for name, folder in name_adapters(unnamed).items():
        if name in named:
            raise InferenceError(
                f"two adapters would both be called {name!r}; name them: --adapter NAME=DIR."
            )
        named[name] = folder
    return named
