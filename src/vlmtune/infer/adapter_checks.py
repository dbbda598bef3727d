"""Before and after an adapter is read for un-merged inference: the header pre-check (a wrong adapter fails
before the base weights load) and whether its rows may share a forward with other adapters' rows. What
un-merged inference accepts of an adapter is decided by the adapter rules (`vlmtune.adapters.rules`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import checkpoint, families
from ..adapters.reader import Adapter, read_adapter

# Roles whose layers see one batch row per batch entry, so PEFT's per-row adapter routing is exact there.
ROW_ROLES = ("language", "embeddings", "lm_head")


def precheck(
    adapters: Mapping[str, Path], folder: Path, family: families.Family, config: dict[str, Any]
) -> None:
    """Place every adapter on the base's safetensors headers before the weights are loaded, so a wrong
    adapter fails in a second instead of after loading a large model (the load checks again, on the model)."""
    from ..adapters.reader import base_params_from_folder

    try:
        params = base_params_from_folder(folder, family, config)
    except checkpoint.CheckpointError:
        return  # no safetensors headers to check against: the model load says why
    for path in adapters.values():
        read_adapter(path, family, params, config, use="unmerged")


def mixability(adapter: Adapter, family: families.Family) -> tuple[bool, str | None]:
    """(whether the adapter's rows may share a forward with other adapters' rows, why not)."""
    if adapter.use_dora:
        return False, "it uses DoRA, which PEFT cannot mix with other adapters in one forward"
    if adapter.bare:
        return False, (
            f"it replaces {', '.join(sorted(adapter.bare))}, one value shared by every row of a forward "
            "(swapped in per forward, so its rows run apart)"
        )
    outside = sorted(
        {
            family.role_of(m) or "unknown part"
            for m in [*adapter.lora, *adapter.full_modules]
            if family.role_of(m) not in ROW_ROLES
        }
    )
    if outside:
        return False, (
            f"it changes the {' and '.join(outside)}, whose layers see image patches rather than batch rows"
        )
    return True, None
