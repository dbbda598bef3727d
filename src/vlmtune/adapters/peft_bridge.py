"""Hand a strictly placed `Adapter` to PEFT, and check that PEFT took every tensor.

Shared by un-merged inference and the merge's `--verify`, so both build the same LoraConfig and fail the
same way; PEFT is imported only when called.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any

from ..io import TensorRecord
from .layout import AdapterError
from .reader import Adapter
from .targets import NO_LORA_TARGETS


def peft_config(adapter: Adapter) -> dict[str, Any]:
    """A PEFT LoraConfig dict in today's runtime names, with exact per-module rank/alpha, so PEFT
    builds exactly the modules the tensors describe (whatever layout the file used)."""
    ranks = Counter(m.r for m in adapter.lora.values())
    alphas = Counter(m.alpha for m in adapter.lora.values())
    r = ranks.most_common(1)[0][0] if ranks else int(adapter.config.get("r", 8))
    alpha = alphas.most_common(1)[0][0] if alphas else float(adapter.config.get("lora_alpha", 8))
    exact = lambda name: re.escape(name)  # noqa: E731 - PEFT matches pattern keys as regex suffixes
    keep = {k: v for k, v in adapter.config.items() if k not in ("rank_pattern", "alpha_pattern")}
    return {
        **keep,
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        # An adapter with no LoRA layer (a projector-only stage 1) gets PEFT's own marker for "none".
        "target_modules": sorted(adapter.lora) or NO_LORA_TARGETS,
        "rank_pattern": {exact(m.module): m.r for m in adapter.lora.values() if m.r != r},
        "alpha_pattern": {exact(m.module): m.alpha for m in adapter.lora.values() if m.alpha != alpha},
        "modules_to_save": adapter.full_modules or None,
        "use_dora": adapter.use_dora,
        "lora_bias": any(m.bias is not None for m in adapter.lora.values()),
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


def peft_state_dict(adapter: Adapter, *, bare: bool = False) -> dict[str, TensorRecord]:
    """Tensors under the keys PEFT saves (runtime names, adapter name removed). The adapter's bare
    parameters (`Adapter.bare`) only with `bare=True`: PEFT loads them into the base parameter itself,
    which is right for a model that runs this one adapter (the merge's reference), never for a base shared
    by several (un-merged inference swaps them in per forward instead, see `infer.registry`)."""
    out: dict[str, TensorRecord] = {}
    for m in adapter.lora.values():
        base = f"base_model.model.{m.module}"
        if m.kind == "embedding":
            out[f"{base}.lora_embedding_A"], out[f"{base}.lora_embedding_B"] = m.A, m.B
        else:
            out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = m.A, m.B
        if m.bias is not None:
            out[f"{base}.lora_B.bias"] = m.bias
        if m.magnitude is not None:
            out[f"{base}.lora_magnitude_vector"] = m.magnitude
    for name, t in adapter.full.items():
        if bare or name not in adapter.bare:
            out[f"base_model.model.{name}"] = t
    return out


def lora_config(adapter: Adapter) -> tuple[Any, list[str]]:
    """The adapter's `LoraConfig` for the installed PEFT (inference mode; weights are loaded after
    creation), and the adapter_config.json keys this PEFT version does not know (dropped)."""
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    config = peft_config(adapter)
    dropped = sorted(k for k, v in config.items() if k not in known and v not in (None, False, {}, [], ""))
    config = {k: v for k, v in config.items() if k in known}
    config.update(inference_mode=True, init_lora_weights=True)
    return LoraConfig(**config), dropped


def load_weights(peft_model: Any, adapter: Adapter, adapter_name: str, *, bare: bool = False) -> None:
    """Load the adapter's tensors into `adapter_name` of a PEFT model (its bare parameters into the base
    only with `bare=True`, see `peft_state_dict`); fail on any unexpected key or any LoRA /
    modules_to_save key of that adapter left missing (PEFT itself would only warn)."""
    from peft import set_peft_model_state_dict

    state = {key: t.torch() for key, t in peft_state_dict(adapter, bare=bare).items()}
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    mine = re.compile(rf"\.{re.escape(adapter_name)}(\.|$)")
    missing = [k for k in result.missing_keys if mine.search(k)]
    if result.unexpected_keys or missing:
        raise AdapterError(
            f"{adapter.path}: PEFT did not take the adapter as vlmtune placed it (unexpected keys: "
            f"{result.unexpected_keys[:5]}, missing keys: {missing[:5]}). This is a vlmtune bug; "
            "please report it with the output of `vlmtune inspect` for this adapter."
        )
