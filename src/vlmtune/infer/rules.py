"""What un-merged inference accepts of an adapter, and how it may batch it: the checks that run before
an adapter is attached (declared base, header pre-check, unsupported settings, base-weight copies), the
warnings it carries, and whether its rows may share a forward with other adapters' rows."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, families
from ..adapters.inspect import declared_family
from ..adapters.manifest import read_manifest
from ..adapters.reader import Adapter, AdapterFormatError, read_adapter
from ..adapters.reader import read_config as read_adapter_config

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
        check_declared_base(Path(path), family)
        read_adapter(path, family, params, config)


def check_declared_base(path: Path, family: families.Family) -> None:
    """A PEFT adapter whose declared base (a local folder) is another family fails here, before its
    language-model keys, which often have the same names in every family, get placed on this base."""
    if not path.is_dir() or read_manifest(path) is not None:
        return  # no folder: read_adapter says so; a manifest: read_adapter checks its family
    config = read_adapter_config(path)
    declared = declared_family(path, config)
    if declared is not None and declared.name != family.name:
        raise AdapterFormatError(
            f"{path} was made for {config.get('base_model_name_or_path')}, a {declared.name} model, but the "
            f"base is a {family.name} model; pass the base it was trained on."
        )


def check_supported(adapter: Adapter) -> None:
    """Settings PEFT would accept but that un-merged inference here cannot reproduce faithfully."""
    bias = adapter.config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterFormatError(
            f"{adapter.path}: adapter_config.json has bias={bias!r} (trained base biases), which vlmtune's "
            "un-merged inference does not support; merge the adapter into the base instead."
        )


def drop_base_copies(adapter: Adapter, base_model: Any) -> None:
    """PEFT saves the base weight of a LoRA-targeted embedding or lm_head beside its LoRA factors
    (`save_embedding_layers`; VLM-R1 adapters have one). An unchanged copy means nothing and is
    dropped; a changed one (a retrained or resized embedding) would change the base under every
    adapter, which un-merged serving cannot do, so it fails with the way out."""
    for name in [n for n in adapter.full if n.rsplit(".", 1)[0] in adapter.lora]:
        saved = adapter.full[name].torch().float()
        current = base_model.get_parameter(name).detach().float().cpu()
        if not torch.allclose(saved, current, rtol=1e-2, atol=1e-3):
            raise AdapterFormatError(
                f"{adapter.path}: the adapter replaces the base weight {name} (saved beside its LoRA "
                "factors, e.g. a retrained or resized embedding), which would change the base under every "
                "adapter; un-merged inference cannot apply it. Merge the adapter (`vlmtune merge`) instead."
            )
        del adapter.full[name]


def mixability(adapter: Adapter, family: families.Family) -> tuple[bool, str | None]:
    """(whether the adapter's rows may share a forward with other adapters' rows, why not)."""
    if adapter.use_dora:
        return False, "it uses DoRA, which PEFT cannot mix with other adapters in one forward"
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


def base_warnings(adapter: Adapter, base: str, fingerprint: str) -> list[str]:
    """A manifest that names a base with the same shapes but other weights: worth a warning, not a refusal."""
    manifest = adapter.manifest
    if manifest is None or not manifest.base.fingerprint or manifest.base.fingerprint == fingerprint:
        return []
    return [
        f"{adapter.path} was trained on {manifest.base.name_or_path} ({manifest.base.fingerprint}), and this "
        f"base ({base}, {fingerprint}) has the same shapes but other weights: outputs will differ "
        "from what the adapter learned unless this is the same model re-saved."
    ]
