"""Writing a complete adapter dir: PEFT's `adapter_config.json` + `adapter_model.safetensors` (fully trained
modules inside as `modules_to_save`), the processor / tokenizer / chat-template files (with the image limits
training used), and `vlmtune.json`. The same function completes Trainer checkpoints and the final adapter,
so every checkpoint is usable on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import checkpoint
from ..fsutil import atomic_dir
from ..io import read_file, read_json
from .layout import AdapterError
from .manifest import MANIFEST, BaseInfo, Manifest, read_manifest
from .targets import TargetPlan

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", MANIFEST)
PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def base_info(model_id: str, folder: Path, config: dict[str, Any], family_name: str) -> BaseInfo:
    """Identity of the base: id or absolute path as given, fingerprint of its config and weights index."""
    architectures = config.get("architectures") or []
    return BaseInfo(
        name_or_path=model_id,
        fingerprint=checkpoint.fingerprint(folder),
        architecture=architectures[0] if architectures else "",
        model_type=str(config.get("model_type", "")),
        family=family_name,
    )


def build_manifest(base: BaseInfo, plan: TargetPlan, training: dict[str, Any]) -> Manifest:
    return Manifest(
        base=base,
        target_regex=plan.target_regex,
        target_modules=list(plan.lora_modules),
        full_modules=list(plan.full_modules),
        full_parameters=list(plan.bare_parameters),
        targets_by_role=plan.targets_by_role,
        training=training,
    )


def complete(folder: str | Path, processor: Any, manifest: Manifest) -> None:
    """Add the processor files and the manifest to a folder that holds PEFT's adapter files."""
    folder = Path(folder)
    processor.save_pretrained(folder)
    manifest.write(folder)
    missing = missing_files(folder)
    if missing:
        raise AdapterError(f"{folder} is incomplete after saving; missing: {', '.join(missing)}.")


def save_adapter(
    model: Any, processor: Any, manifest: Manifest, out: str | Path, overwrite: bool = False
) -> Path:
    """Write a complete adapter dir at `out` atomically (a reader never sees half of it)."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        add_bare(model, tmp)
        complete(tmp, processor, manifest)
    return Path(out)


# -- bare parameters ------------------------------------------------------------------------------------
# A bare parameter trained in full (LLaVA-NeXT's `model.image_newline`, see `TargetPlan.bare_parameters`)
# belongs to no module PEFT wraps, so PEFT neither saves it nor lists it in its state dict. It is stored
# in the same file under its PEFT parameter name, `base_model.model.<runtime name>`: the key PEFT's own
# `PeftModel.from_pretrained` / `load_adapter` (and so a Trainer resume) load back into the parameter.


def bare_trainables(peft_model: Any) -> list[str]:
    """The trainable parameters of a PEFT model that no adapter owns (no adapter name in their path):
    the bare parameters vlmtune made trainable beside PEFT's LoRA and modules_to_save."""
    adapters = set(getattr(peft_model, "peft_config", {}))
    return [
        name
        for name, param in peft_model.named_parameters()
        if param.requires_grad and not adapters & set(name.split("."))
    ]


def adapter_state(peft_model: Any, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the adapter file holds, by key: PEFT's `get_peft_model_state_dict` plus the bare trainables
    (`state_dict`: parameter name -> tensor, default the live parameters)."""
    from peft import get_peft_model_state_dict

    out = get_peft_model_state_dict(peft_model, state_dict=state_dict)
    source = state_dict if state_dict is not None else dict(peft_model.named_parameters())
    out.update({name: source[name] for name in bare_trainables(peft_model) if name in source})
    return out


def add_bare(peft_model: Any, folder: str | Path, state_dict: dict[str, Any] | None = None) -> None:
    """After PEFT's `save_pretrained` into `folder`: add the bare trainables to its adapter file (rewritten
    beside it and renamed over it). Nothing to do for families without bare parameters."""
    import os

    from safetensors.torch import save_file

    names = bare_trainables(peft_model)
    if not names:
        return
    source = state_dict if state_dict is not None else dict(peft_model.named_parameters())
    path = Path(folder) / "adapter_model.safetensors"
    tensors = {name: t.torch() for name, t in read_file(path).items()}
    tensors.update({name: source[name].detach().to("cpu").contiguous() for name in names})
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def missing_files(folder: str | Path) -> list[str]:
    """What an adapter dir lacks to be used on its own (empty when complete)."""
    folder = Path(folder)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not any((folder / name).is_file() for name in PROCESSOR_CONFIGS):
        missing.append(" or ".join(PROCESSOR_CONFIGS))
    if not _has_chat_template(folder):
        missing.append("a chat template (chat_template.jinja)")
    return missing


def _has_chat_template(folder: Path) -> bool:
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(read_json(config).get("chat_template"))


def check_base(adapter_dir: str | Path, base: BaseInfo) -> Manifest:
    """The manifest of `adapter_dir`, after checking it was made for `base` (fingerprint match)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AdapterError(f"{adapter_dir} is not an adapter dir (no adapter_config.json).")
    manifest = read_manifest(adapter_dir)
    if manifest is None:
        raise AdapterError(
            f"{adapter_dir} has no {MANIFEST}, so vlmtune cannot tell which base it was made for; "
            "init_from takes adapter dirs written by vlmtune train."
        )
    if manifest.base.fingerprint != base.fingerprint:
        raise AdapterError(
            f"{adapter_dir} was made for base {manifest.base.name_or_path} (fingerprint "
            f"{manifest.base.fingerprint}), but this run's base is {base.name_or_path} ({base.fingerprint}); "
            "use the same base, or start without init_from."
        )
    return manifest


def load_into(peft_model: Any, adapter_dir: str | Path) -> int:
    """Copy an earlier adapter's tensors (LoRA and modules_to_save) into `peft_model`'s matching
    parameters; every tensor must find its place. Returns the number of tensors loaded."""
    from peft import set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    state = {name: t.torch() for name, t in read_file(adapter_dir / "adapter_model.safetensors").items()}
    # The tensors this run's adapter will save. A stored projector that is frozen here would otherwise
    # load into the *base* weights and be missing from the new adapter, so only these names are accepted.
    own = adapter_state(peft_model)
    homeless = sorted(set(state) - set(own))
    if homeless:
        raise AdapterError(
            f"init_from {adapter_dir} holds {len(homeless)} tensor(s) this run's adapter has no place for "
            f"(e.g. {homeless[0]}); train the same LoRA targets, and set projector: full if that run trained "
            "the projector fully."
        )
    wrong = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise AdapterError(
            f"init_from {adapter_dir}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)} but this run's adapter "
            f"needs {tuple(own[wrong[0]].shape)}; use the same lora.r."
        )
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise AdapterError(f"init_from {adapter_dir}: PEFT could not place {result.unexpected_keys[:3]}.")
    return len(state)
