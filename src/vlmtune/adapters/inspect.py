"""`vlmtune inspect ADAPTER_DIR [--base BASE]`: what an adapter folder is, whether it fits a base, and
whether vLLM can serve it as it is.

Without a base, roles are read from the key names through the family's layouts (the family comes from
`vlmtune.json`, a foreign format's owner (e.g. LLaVA outputs), the declared base folder, or the key names). With a base, the adapter is
placed strictly, exactly as `predict`/`merge` would, and the report says what fits or why not. Needs no
torch unless the base is a hub id without local weights (its shapes then come from a meta-device model).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import checkpoint, families
from ..errors import VlmtuneError
from ..families import Family, ForeignFormat
from . import rules
from .files import read_files
from .layout import candidate_layouts, split_key
from .manifest import made_for
from .reader import base_values_from_folder, pattern_value, read_adapter
from .rules import declared_family

# vLLM (0.33): `--max-lora-rank` takes one of these values and defaults to 16.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16


def inspect_adapter(folder: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """A report (plain JSON-able dict) on an adapter folder; `base` adds a strict fit check."""
    found = read_files(folder)
    folder, config, manifest, tensors, files = (
        found.folder,
        found.config,
        found.manifest,
        found.tensors,
        found.files,
    )

    if base is not None:
        base_folder, base_config, base_params = base_shapes(base)
        family: Family | None = families.detect(base_config)
        base_values = None  # no local weights: a saved base copy cannot be compared with the base
        with contextlib.suppress(checkpoint.CheckpointError):
            base_values = base_values_from_folder(base_folder, family, base_config)
    else:
        family = guess_family(folder, config, manifest, found.foreign_family, tensors)

    report: dict[str, Any] = {
        "kind": "adapter",
        "path": str(folder),
        "format": found.format,
        "family": family.name if family else None,
        "made_for": made_for(config, manifest),
        "files": {f.name: f.stat().st_size for f in files},
    }
    modules, full, layouts = describe_keys(tensors, config, family)
    fit: dict[str, Any] = {"checked": False, "note": "pass --base BASE to check that the adapter fits a base"}
    if base is not None and family is not None:
        fit = {"checked": True, "base": str(base), "base_family": family.name}
        try:
            adapter = read_adapter(
                folder,
                family,
                base_params,
                base_config,
                use="inspect",
                base_fingerprint=checkpoint.fingerprint(base_folder) if base_values else None,
                base_values=base_values,
            )
        except VlmtuneError as exc:
            fit.update(fits=False, error=str(exc))
            findings = rules.evaluate("files", rules.Context(found, family, base_params, base_config))
        else:
            findings = adapter.findings
            modules = [
                {
                    "module": m.module,
                    "role": family.role_of(m.module) or "other",
                    "kind": m.kind,
                    "r": m.r,
                    "alpha": m.alpha,
                    "scaling": m.scaling,
                    "dora": m.magnitude is not None,
                }
                for m in adapter.lora.values()
            ]
            full = sorted([*adapter.full, *adapter.unchanged_copies])
            layouts = sorted(adapter.layouts)
            fit.update(fits=True, placed_tensors=len(tensors), lora_modules=len(adapter.lora))
            fit["full_tensors"] = len(adapter.full) + len(adapter.unchanged_copies)
            if manifest is not None and manifest.base.fingerprint:
                fit["same_base_as_training"] = manifest.base.fingerprint == checkpoint.fingerprint(
                    base_folder
                )
    else:
        findings = rules.evaluate("files", rules.Context(found, family, {}, {}), with_base=False)
    report["rules"] = rule_report(findings, fit)
    lora_names = {m["module"] for m in modules}
    # PEFT saves the base weight of a LoRA-targeted lm_head/embedding beside its factors
    # (`save_embedding_layers`): a copy of the base (or a resized/retrained one), not modules_to_save.
    copies = [n for n in full if n.rsplit(".", 1)[0] in lora_names]
    full = [n for n in full if n not in copies]
    report["key_layouts"] = layouts
    report["lora"] = summarize(modules, config)
    report["full_modules"] = full_modules(full, family)
    if copies:
        report["base_weight_copies"] = copies
    report["size"] = {
        "tensors": len(tensors),
        "parameters": sum(t.numel for t in tensors.values()),
        "bytes": sum(t.nbytes for t in tensors.values()),
        "dtypes": sorted({t.dtype for t in tensors.values()}),
    }
    report["fit"] = fit
    report["vllm"] = vllm_report(modules, full, family, found.foreign)
    if manifest is not None:
        report["manifest"] = {
            "base": manifest.base.name_or_path,
            "fingerprint": manifest.base.fingerprint,
            "architecture": manifest.base.architecture,
            "versions": manifest.versions,
        }
    return report


def rule_report(findings: list[rules.Finding], fit: dict[str, Any]) -> dict[str, Any]:
    """What `predict`/`chat`/`serve` (unmerged) and `merge` will say of this folder: the same rules
    (`adapters.rules`) they apply, so the verdicts here are theirs. An adapter that does not fit the base
    is refused by both (after any rule checked before placement)."""
    out: dict[str, Any] = rules.verdicts(findings)
    if fit.get("fits") is False:
        for use in rules.APPLYING_USES:
            out[use] = {"verdict": "refuse", "because": [*out[use]["because"], fit["error"]]}
    out["findings"] = [f.to_dict() for f in findings]
    out["checked"] = "with the base" if fit["checked"] else "without a base: only the folder's own settings"
    return out


def base_shapes(base: str | Path) -> tuple[Path, dict[str, Any], dict[str, tuple[int, ...]]]:
    """(folder, config, runtime parameter shapes) of a base: from safetensors headers when the weights are
    local, else from the module tree built on the meta device (no weights are downloaded)."""
    from .reader import base_params_from_folder, base_params_from_model

    folder = checkpoint.resolve(base, allow_patterns=["*.json"])
    config = checkpoint.read_config(folder)
    family = families.detect(config)
    try:
        return folder, config, base_params_from_folder(folder, family, config)
    except checkpoint.CheckpointError:
        from ..modeling import meta_model

        return folder, config, base_params_from_model(meta_model(config))


def guess_family(
    folder: Path,
    config: Mapping[str, Any],
    manifest: Any,
    foreign_family: Family | None,
    tensors: Mapping[str, Any],
) -> Family | None:
    if manifest is not None:
        return families.get(manifest.base.family)
    if foreign_family is not None:  # the family that declares the folder's foreign format
        return foreign_family
    declared = declared_family(folder, config)
    if declared is not None:
        return declared
    # The family whose role prefixes take every key with the least renaming (runtime names before its
    # on-disk table, before foreign tools' tables, whose catch-all rules would take almost anything), then
    # whose LoRA target patterns take the most LoRA modules (GLM-4.1V has no language `gate_proj`); families
    # that still tie share names and agree on roles (Qwen2-VL, Qwen2.5-VL), so the first reads the same.
    best: tuple[tuple[int, int], Family] | None = None
    split = [split_key(k) for k in tensors]
    params = {s.written for s in split}
    lora = {s.module for s in split if s.is_lora}
    for family in families.FAMILIES.values():
        names = [layout for layout, _ in candidate_layouts(family)]
        used = [layout_of(p, family) for p in params]
        if "unknown" in used:
            continue
        patterns = [re.compile(p) for p in family.lora_target_patterns.values()]
        misses = sum(not any(p.fullmatch(runtime_module(m, family)[0]) for p in patterns) for m in lora)
        score = (max((names.index(u) for u in used), default=0), misses)
        if best is None or score < best[0]:
            best = (score, family)
    return best[1] if best else None


def runtime_module(written: str, family: Family | None) -> tuple[str, str | None]:
    """(runtime module path, role) for a module path as written, trying the family's layouts in order."""
    if family is None:
        return written, None
    for _, table in candidate_layouts(family):
        name = table.to_runtime(written + ".weight")[: -len(".weight")]
        role = family.role_of(name)
        if role is not None:
            return name, role
    return written, None


def runtime_param(written: str, family: Family | None) -> str:
    """The runtime name of a replaced parameter as written, through the first layout that gives it a role."""
    if family is None:
        return written
    for _, table in candidate_layouts(family):
        name = table.to_runtime(written)
        if family.role_of(name) is not None:
            return name
    return written


def describe_keys(
    tensors: Mapping[str, Any], config: Mapping[str, Any], family: Family | None
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """LoRA modules (rank from the tensors, alpha from the config), full tensors and the layouts seen,
    without a base: what the keys say on their own."""
    lora: dict[str, dict[str, Any]] = {}
    full: list[str] = []
    layouts: set[str] = set()
    for key, tensor in tensors.items():
        split = split_key(key)
        if family is not None:
            layouts.add(layout_of(split.written, family))
        if not split.is_lora:
            full.append(runtime_param(split.written, family))
            continue
        name, _ = runtime_module(split.module, family)
        entry = lora.setdefault(name, {"module": name, "written": split.module, "dora": False})
        if split.slot in ("lora_A.weight", "lora_embedding_A"):
            entry["r"] = tensor.shape[0]  # lora_A is (r, in) or (r, in, k...); lora_embedding_A is (r, vocab)
            entry["kind"] = (
                "embedding"
                if split.slot == "lora_embedding_A"
                else "conv"
                if len(tensor.shape) > 2
                else "linear"
            )
        if split.slot == "lora_magnitude_vector":
            entry["dora"] = True
    modules = []
    for entry in lora.values():
        r = int(entry.get("r", config.get("r", 8)))
        alpha = float(
            pattern_value(config.get("alpha_pattern") or {}, entry["written"], config.get("lora_alpha", r))
        )
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules.append(
            {
                "module": entry["module"],
                "role": (family.role_of(entry["module"]) if family else None) or "other",
                "kind": entry.get("kind", "linear"),
                "r": r,
                "alpha": alpha,
                "scaling": scaling,
                "dora": entry["dora"],
            }
        )
    return modules, sorted(full), sorted(layouts)


def layout_of(written: str, family: Family) -> str:
    """The first layout that gives the parameter name as written a role."""
    for layout, table in candidate_layouts(family):
        if family.role_of(table.to_runtime(written)) is not None:
            return layout
    return "unknown"


def summarize(modules: list[dict[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """LoRA modules grouped by role and (rank, alpha, scaling, kind): how many, on which layer names."""
    groups: dict[str, dict[str, Any]] = {}
    for m in sorted(modules, key=lambda m: (m["role"], m["r"], m["module"])):
        scaling = round(m["scaling"], 6)
        label = f"{m['role']} r={m['r']} alpha={m['alpha']:g} scaling={scaling:g}"
        if m["kind"] != "linear":
            label += f" {m['kind']}"
        group = groups.setdefault(
            label,
            {
                "role": m["role"],
                "r": m["r"],
                "alpha": m["alpha"],
                "scaling": scaling,
                "kind": m["kind"],
                "modules": 0,
                "layers": [],
            },
        )
        group["modules"] += 1
        leaf = m["module"].rsplit(".", 1)[-1]
        if leaf not in group["layers"]:
            group["layers"].append(leaf)
    return {
        "modules": len(modules),
        "roles": sorted({m["role"] for m in modules}),
        "ranks": sorted({m["r"] for m in modules}),
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": any(m["dora"] for m in modules),
        "groups": groups,
    }


def trained_unit(name: str, family: Family | None) -> str:
    """What a fully replaced tensor trains: its module, or itself when it is a bare parameter (whose module
    would be the whole model, see `Adapter.bare`)."""
    return name if family is not None and name in family.bare_parameters else name.rsplit(".", 1)[0]


def full_modules(full: list[str], family: Family | None) -> dict[str, Any]:
    modules = sorted({trained_unit(name, family) for name in full})
    return {
        "modules": modules,
        "roles": sorted({(family.role_of(m) if family else None) or "other" for m in modules}),
    }


def vllm_report(
    modules: list[dict[str, Any]], full: list[str], family: Family | None, foreign: ForeignFormat | None
) -> dict[str, Any]:
    """Whether vLLM can serve the adapter as it is, the flags it needs, and what to do otherwise."""
    problems: list[str] = []
    flags = ["--enable-lora"]
    notes: list[str] = []
    if family is not None and family.vllm_unsupported:
        problems.append(
            f"{family.vllm_unsupported}; run it un-merged with `vlmtune predict`/`vlmtune chat`, "
            "or merge it and serve the merged model with transformers."
        )
    if foreign is not None:
        problems.append(
            foreign.vllm_problem or f"it is {foreign.what}; vLLM reads PEFT adapter folders only."
        )
    if full:
        shown = ", ".join(sorted({trained_unit(n, family) for n in full})[:4])
        problems.append(
            f"it trains whole modules ({shown}), stored as modules_to_save, which vLLM rejects (vllm #9280). "
            "Merge it with `vlmtune merge` and serve the merged model."
        )
    if any(m["dora"] for m in modules):
        problems.append("it is a DoRA adapter, which vLLM does not support. Merge it with `vlmtune merge`.")
    head = [m["module"] for m in modules if m["role"] == "lm_head"]
    if head:
        problems.append(
            f"it puts LoRA on {head[0]}, which vLLM rejects (vllm #21500; VLM-R1 targets it). "
            "Merge it with `vlmtune merge`, or retrain without lm_head in the targets."
        )
    tower = sorted({m["role"] for m in modules if m["role"] in ("vision", "projector")})
    if tower:
        flags.append("--enable-tower-connector-lora")
        notes.append(
            f"it has LoRA on the {' and '.join(tower)}: vLLM applies it only with --enable-tower-connector-lora "
            "and silently ignores it otherwise (vllm #23796)."
        )
    top = max((m["r"] for m in modules), default=0)
    if top > VLLM_DEFAULT_RANK:
        allowed = [r for r in VLLM_RANKS if r >= top]
        if not allowed:
            problems.append(f"its rank {top} exceeds vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]}).")
        else:
            flags.append(f"--max-lora-rank {allowed[0]}")
            notes.append(
                f"its largest rank is {top}, above vLLM's default --max-lora-rank {VLLM_DEFAULT_RANK}."
            )
    return {"servable_as_is": not problems, "problems": problems, "flags": flags, "notes": notes}
