"""What the server says about its models, where runtime adapter loads may read from, and the vLLM hand-off.

Descriptions (rank, targets, vLLM verdict) come from `adapters.inspect` — the one address of that verdict —
and are cached by the adapter's content hash, so a different adapter reloaded under the same name is
described afresh.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..adapters.files import refuse_pickled
from ..adapters.inspect import inspect_adapter
from ..adapters.layout import AdapterError
from ..infer.types import BASE, BASE_ALIASES
from .errors import ApiError
from .settings import ServeSettings

NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def adapter_hash(info: Any) -> str:
    return str(info.sha256)


class Describer:
    """Per adapter content hash: its `inspect` report (with the fit against the served base)."""

    def __init__(self, base_folder: Path) -> None:
        self.base_folder = base_folder
        self.reports: dict[str, dict[str, Any]] = {}
        self.loaded_at: dict[str, int] = {}

    def report(self, info: Any) -> dict[str, Any]:
        key = adapter_hash(info)
        if key not in self.reports:
            self.reports[key] = inspect_adapter(info.path, base=self.base_folder)
            self.loaded_at[key] = int(time.time())
        return self.reports[key]

    def entry(self, info: Any, base: str) -> dict[str, Any]:
        report = self.report(info)
        lora = report.get("lora", {})
        key = adapter_hash(info)
        return {
            "id": info.name,
            "object": "model",
            "created": self.loaded_at[key],
            "owned_by": "vlmtune",
            "root": str(info.path),
            "parent": base,
            "base": base,
            "path": str(info.path),
            "sha256": adapter_hash(info),
            "ranks": lora.get("ranks", []),
            "targets": {
                "roles": lora.get("roles", []),
                "layers": sorted({leaf for g in lora.get("groups", {}).values() for leaf in g["layers"]}),
                "modules": lora.get("modules", 0),
            },
            "full_modules": report.get("full_modules", {}).get("modules", []),
            "use_dora": bool(lora.get("use_dora")),
            "format": info.format,
            "vllm_servable": report.get("vllm", {}).get("servable_as_is"),
        }


def base_entry(base: str, started: int) -> dict[str, Any]:
    return {
        "id": base,
        "object": "model",
        "created": started,
        "owned_by": "vlmtune",
        "root": base,
        "parent": None,
    }


def resolve_model(model: str, base: str, adapters: Mapping[str, Any]) -> str:
    """The engine adapter name an OpenAI `model` selects: an adapter name, or the base (its id or
    `__base__` / `none`)."""
    if model in adapters:
        return model
    if model == base or model.strip().lower() in BASE_ALIASES or model == Path(base).name:
        return BASE
    known = ", ".join([base, *adapters]) or base
    raise ApiError(
        404,
        f"the model {model!r} does not exist here; choose one of: {known}.",
        param="model",
        code="model_not_found",
    )


def check_name(name: str) -> None:
    if not NAME.match(name) or name.strip().lower() in BASE_ALIASES:
        raise ApiError(
            400,
            "adapter names are 1-64 letters, digits, '_' or '-' (__base__ and none are reserved).",
            param="name",
        )


def resolve_adapter_path(path: str, settings: ServeSettings) -> Path:
    """The folder a runtime load may read: inside `--adapter-dir` after resolving links, safetensors only."""
    if settings.adapter_dir is None:
        raise ApiError(
            403,
            "runtime adapter loading is off; start the server with --adapter-dir DIR to allow it.",
            code="adapter_loading_disabled",
        )
    given = Path(path)
    folder = (given if given.is_absolute() else settings.adapter_dir / given).resolve()
    if not folder.is_relative_to(settings.adapter_dir):
        raise ApiError(
            400, "the adapter path is outside --adapter-dir; paths must stay inside it.", param="path"
        )
    if not folder.is_dir():
        raise ApiError(
            400,
            f"no adapter folder {folder.relative_to(settings.adapter_dir)} in --adapter-dir.",
            param="path",
        )
    try:
        refuse_pickled(folder, f"the adapter folder {folder.relative_to(settings.adapter_dir)}")
    except AdapterError as exc:
        raise ApiError(400, str(exc), param="path") from None
    return folder


def vllm_command(base: str, adapters: Mapping[str, Path]) -> str:
    """The `vllm serve` line for the adapters vLLM can serve as they are, and why not for the others
    (the verdict is `adapters.inspect`'s)."""
    servable: dict[str, Path] = {}
    flags: list[str] = []
    lines: list[str] = []
    for name, path in adapters.items():
        verdict = inspect_adapter(path, base=base)["vllm"]
        if verdict["servable_as_is"]:
            servable[name] = Path(path)
            flags += [f for f in verdict["flags"] if f not in flags]
        else:
            lines.append(
                f"# {name} ({path}) cannot be served by vLLM as it is: " + " ".join(verdict["problems"])
            )
    if servable:
        ranks = [f for f in flags if f.startswith("--max-lora-rank")]
        other = [f for f in flags if not f.startswith("--max-lora-rank")]
        if len(ranks) > 1:
            top = max(int(f.split()[1]) for f in ranks)
            ranks = [f"--max-lora-rank {top}"]
        modules = " ".join(shlex.quote(f"{n}={p}") for n, p in servable.items())
        parts = [
            "vllm serve",
            shlex.quote(str(base)),
            *other,
            f"--lora-modules {modules}",
            *ranks,
            f"--max-loras {len(servable)}",
        ]
        lines.insert(0, " ".join(parts))
    elif not lines:
        lines.append(f"vllm serve {shlex.quote(str(base))}")
    return "\n".join(lines)
