"""Typed dataclasses from YAML plus dotted `key=value` overrides (torchtune style: `lora.r=16 lr=2e-4`): the
machinery, apart from any one schema (`vlmtune.config` holds the training config's).

Every key is checked against the dataclass fields: an unknown key is an error that names the closest known
key, a value of the wrong type is an error that names the key and the expected type. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import VlmtuneError

# (unknown dotted key, the keys it could have been) -> the hint appended to the error.
Suggest = Callable[[str, list[str]], str]


class ConfigError(VlmtuneError, ValueError):
    """A config file or override the user must fix."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys (got {type(data).__name__}).")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`a.b=value` sets data['a']['b']; the value is parsed as YAML (`lr=2e-4`, `lora.targets=[a, b]`)."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. lora.r=16).")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section.")
            node = child
        node[parts[-1]] = value
    return out


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def known_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts (sections and leaves)."""
    out: list[str] = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        out.append(name)
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out.extend(known_keys(hint, name + "."))
    return out


def close_match(key: str, candidates: list[str]) -> str:
    """' ; did you mean X?' for the closest candidate, or a list of valid keys when nothing is close."""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid keys: {', '.join(sorted(candidates))}."


def from_dict(
    cls: type,
    data: dict[str, Any],
    prefix: str = "",
    root: type | None = None,
    suggest: Suggest | None = None,
) -> Any:
    """Build dataclass `cls` from a mapping, coercing YAML scalars and rejecting unknown keys (each named
    with `suggest(key, candidates)`, by default the closest candidate)."""
    root = root or cls
    suggest = suggest or close_match
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in hints:
            siblings = [prefix + n for n in names]
            hint = suggest(dotted, siblings)
            if "did you mean" not in hint:
                hint = suggest(dotted, known_keys(root))
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted, root, suggest)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, root: type, suggest: Suggest) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, key + ".", root, suggest)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # Try the richer types first so "8" stays an int for `int | None` but a list stays a list.
        for arg in sorted((a for a in args if a is not type(None)), key=_coerce_order):
            try:
                return _coerce(value, arg, key, root, suggest)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{key}: {value!r} is not {_describe(hint)}.")
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        if value in args:
            return value
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))} (got {value!r}).")
    if origin is dict:
        _, item = args
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {value!r}).")
        return {str(k): _coerce(v, item, f"{key}.{k}", root, suggest) for k, v in value.items()}
    if origin is list:
        (item,) = args
        if isinstance(value, (str, int, float)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list (got {value!r}).")
        return [_coerce(v, item, f"{key}[{i}]", root, suggest) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"{key} must be true or false (got {value!r}).")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a whole number (got {value!r}).")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
        raise ConfigError(f"{key} must be a whole number (got {value!r}).")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number (got {value!r}).")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number (got {value!r}).")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string (got {value!r}).")
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")


def _coerce_order(hint: Any) -> int:
    if hint is bool:
        return 0
    if typing.get_origin(hint) is Literal:
        return 1
    if typing.get_origin(hint) is list:
        return 2
    if hint in (int, float):
        return 3
    return 4


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    parts = []
    for a in args:
        if typing.get_origin(a) is Literal:
            parts.extend(repr(x) for x in typing.get_args(a))
        elif typing.get_origin(a) is list:
            parts.append("a list")
        else:
            parts.append(getattr(a, "__name__", str(a)))
    return " or ".join(parts)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
