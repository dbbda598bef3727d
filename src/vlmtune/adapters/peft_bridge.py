"""Hand a strictly placed `Adapter` to PEFT, and check that PEFT took every tensor.

Shared by un-merged inference and the merge's `--verify`, so both build the same LoraConfig and fail the
same way; PEFT is imported only when called.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from .layout import AdapterKeyError
from .reader import Adapter


def lora_config(adapter: Adapter) -> tuple[Any, list[str]]:
    """The adapter's `LoraConfig` for the installed PEFT (inference mode; weights are loaded after
    creation), and the adapter_config.json keys this PEFT version does not know (dropped)."""
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    config = adapter.peft_config()
    dropped = sorted(k for k, v in config.items() if k not in known and v not in (None, False, {}, [], ""))
    config = {k: v for k, v in config.items() if k in known}
    config.update(inference_mode=True, init_lora_weights=True)
    return LoraConfig(**config), dropped


def load_weights(peft_model: Any, adapter: Adapter, adapter_name: str) -> None:
    """Load the adapter's tensors into `adapter_name` of a PEFT model; fail on any unexpected key or any
    LoRA / modules_to_save key of that adapter left missing (PEFT itself would only warn)."""
    from peft import set_peft_model_state_dict

    state = {key: t.torch() for key, t in adapter.peft_state_dict().items()}
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    mine = re.compile(rf"\.{re.escape(adapter_name)}(\.|$)")
    missing = [k for k in result.missing_keys if mine.search(k)]
    if result.unexpected_keys or missing:
        raise AdapterKeyError(
            f"{adapter.path}: PEFT did not take the adapter as vlmtune placed it (unexpected keys: "
            f"{result.unexpected_keys[:5]}, missing keys: {missing[:5]}). This is a vlmtune bug; "
            "please report it with the output of `vlmtune inspect` for this adapter."
        )
