"""`vlmtune inspect`: what a folder is, and what vlmtune would do with it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint, families, modeling
from .errors import VlmtuneError
from .families import Family


def inspect_model(path: str | Path) -> dict[str, Any]:
    """Family, class, parameters and Linear layers by role, the default LoRA targets, tied embeddings.

    Builds the module tree on the meta device, so it costs the same for 2 B and 90 B models.
    """
    folder = checkpoint.resolve(path, allow_patterns=["*.json", "*.jinja"])
    config = checkpoint.read_config(folder)
    family = families.detect(config)
    model = modeling.meta_model(config)
    linears = modeling.linear_layers(model, family)
    by_role: dict[str, dict[str, int]] = {}
    for layer in linears:
        slot = by_role.setdefault(layer.role or "other", {"modules": 0, "params": 0})
        slot["modules"] += 1
        slot["params"] += layer.params
    pattern = re.compile(family.default_target_regex)
    targeted = [layer for layer in linears if pattern.fullmatch(layer.name)]
    params = modeling.params_by_role(model, family)
    report: dict[str, Any] = {
        "kind": "model",
        "path": str(path),
        "family": family.name,
        "architecture": type(model).__name__,
        "model_type": config.get("model_type"),
        "parameters": {"total": sum(params.values()), "by_role": params},
        "linear_layers": by_role,
        "default_lora_targets": {
            "regex": family.default_target_regex,
            "modules": len(targeted),
            "params": sum(layer.params for layer in targeted),
            "roles": sorted({layer.role or "other" for layer in targeted}),
        },
        "tied_embeddings": families.tied_embeddings(config),
    }
    weights: dict[str, Any] = {}
    try:
        weights = checkpoint.tensor_index(folder)
        report["weights"] = {
            "files": len({t.file for t in weights.values()}),
            "tensors": len(weights),
            "bytes": sum(t.nbytes for t in weights.values()),
            "dtypes": sorted({t.dtype for t in weights.values()}),
            "layout": family.disk_layout(weights),
        }
    except checkpoint.CheckpointError as exc:
        report["weights"] = {"error": str(exc)}
    local = Path(path).expanduser().is_dir()
    error = report["weights"].get("error") if local else None
    report["vllm"] = vllm_model_report(family, Folder(folder, config, list(weights), error))
    if not local:  # a hub id: only its *.json / *.jinja files were fetched
        report["vllm"]["note"] = "weights not checked (not downloaded)"
    return report


@dataclass(frozen=True)
class Folder:
    """What `vllm_model_report` reads of a model folder (inspect has read it already)."""

    path: Path
    config: dict[str, Any]
    tensor_names: list[str]
    weights_error: str | None = None


# What a merged folder must be for `vllm serve FOLDER`, besides a family vLLM serves.
VLLM_NEEDS = ("tokenizer", "processor", "chat_template")


def vllm_model_report(family: Family, folder: Folder | None = None) -> dict[str, Any]:
    """Whether vLLM can serve a model folder as it is (`vllm serve FOLDER`), one line per reason.

    Without a folder, the family's verdict alone: what the README's "vLLM after merge" column shows, for a
    folder as `vlmtune merge` writes it (every family's merged folder is inspected against the column in
    tests/test_merge.py). A folder must also name the family's architecture in config.json (vLLM picks its
    model class by it), hold safetensors weights with no PEFT leftovers, and the tokenizer, processor and
    chat template files."""
    from .adapters.layout import LORA_SLOTS, PEFT_PREFIX, WRAPPERS
    from .merging.export import loader_gaps

    problems = [family.vllm_unsupported] if family.vllm_unsupported else []
    if folder is not None:
        architectures = folder.config.get("architectures") or []
        if family.architecture not in architectures:
            problems.append(
                f"config.json names architectures {architectures}, not {family.architecture}: vLLM picks "
                "its model class by it; restore the base's config.json"
            )
        if folder.weights_error:
            problems.append(folder.weights_error)
        peft = [
            n
            for n in folder.tensor_names
            if n.startswith(PEFT_PREFIX) or any(p in LORA_SLOTS or p in WRAPPERS for p in n.split("."))
        ]
        leftovers = sorted(p.name for p in folder.path.glob("adapter_*") if p.is_file())
        if peft or leftovers:
            shown = ", ".join((peft + leftovers)[:2])
            problems.append(
                f"it still holds PEFT adapter parts ({shown}): it is not a merged model; merge it with "
                "`vlmtune merge BASE ADAPTER OUT` and serve OUT"
            )
        gaps = loader_gaps(folder.path)
        problems += [f"{gaps[need]}: vLLM needs it" for need in VLLM_NEEDS if need in gaps]
    return {"servable": not problems, "problems": problems}


def vllm_cell(report: dict[str, Any]) -> str:
    """A vLLM verdict as the support table writes it."""
    return "yes" if report["servable"] else "no: " + "; ".join(report["problems"])


def inspect_path(path: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """Inspect a model folder or an adapter folder (the adapter half lives in `vlmtune.adapters`)."""
    folder = Path(path)
    if (folder / "adapter_config.json").is_file() or families.foreign_format(folder, {}) is not None:
        from .adapters.inspect import inspect_adapter

        return inspect_adapter(folder, base=base)
    if base is not None:
        raise VlmtuneError(f"--base checks an adapter against a base, but {path} is not an adapter folder.")
    return inspect_model(path)


def render(report: dict[str, Any]) -> str:
    """A short human-readable rendering of an inspect report."""
    lines: list[str] = []

    def walk(obj: Any, indent: int) -> None:
        pad = "  " * indent
        for key, value in obj.items():
            if isinstance(value, dict):
                lines.append(f"{pad}{key}:")
                walk(value, indent + 1)
            elif isinstance(value, list) and len(value) > 8:
                lines.append(f"{pad}{key}: {len(value)} items ({', '.join(map(str, value[:3]))}, ...)")
            else:
                shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
                lines.append(f"{pad}{key}: {shown}")

    walk(report, 0)
    return "\n".join(lines)
