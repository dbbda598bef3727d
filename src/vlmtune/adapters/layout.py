"""Strict key mapping: every adapter tensor is placed on exactly one module of the base, or we fail.

PEFT only warns about missing adapter keys and the adapter then silently does nothing (peft #2566;
FIELD_NOTES §2). Its own remapping misses legacy Qwen2-VL keys and LLaVA projector keys. So vlmtune maps
keys itself: each key is tried as written (today's runtime names), then through the family's on-disk /
pre-4.52 key table, then through the key tables of the foreign formats it declares (e.g. original LLaVA),
and accepted only when the target exists in the base.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import VlmtuneError
from ..families import Family, KeyTable

PEFT_PREFIX = "base_model.model."
LORA_SLOTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
# Wrappers PEFT (or older PEFT versions) put between a module and its parameters.
WRAPPERS = ("modules_to_save", "original_module", "base_layer")


class AdapterError(VlmtuneError, ValueError):
    """An adapter folder that cannot be used as asked: incomplete, a setting vlmtune cannot apply faithfully,
    a tensor that cannot be placed on the base or lands on the wrong shape."""


@dataclass(frozen=True)
class SplitKey:
    """One adapter key taken apart. `slot` is e.g. 'lora_A.weight', 'lora_magnitude_vector', or
    'weight'/'bias' for a tensor that replaces a base parameter outright (modules_to_save)."""

    source: str
    module: str  # module path as written (PEFT prefix and adapter name removed)
    slot: str

    @property
    def is_lora(self) -> bool:
        return self.slot.split(".")[0] in LORA_SLOTS

    @property
    def written(self) -> str:
        """The base parameter the key is about, as written: a LoRA's weight, or the replaced parameter (a
        parameter at the root, such as LLaVA-NeXT's `image_newline` in the hub layout, has no module)."""
        return f"{self.module}.weight" if self.is_lora else ".".join(filter(None, (self.module, self.slot)))


def strip_prefix(key: str) -> str:
    """Remove PEFT's `base_model.model.` (and the extra `model.` LLaVA's scripts sometimes add)."""
    if key.startswith(PEFT_PREFIX):
        return key[len(PEFT_PREFIX) :]
    if key.startswith("base_model."):
        key = key[len("base_model.") :]
    if key.startswith("model.model."):
        key = key[len("model.") :]
    return key


def split_key(key: str) -> SplitKey:
    parts = strip_prefix(key).split(".")
    for i, part in enumerate(parts):
        if part in LORA_SLOTS:
            tail = parts[i + 1 :]
            param = tail[-1] if tail and tail[-1] in ("weight", "bias") else None
            slot = (
                part
                if part in ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
                else f"{part}.{param or 'weight'}"
            )
            return SplitKey(key, ".".join(parts[:i]), slot)
    # A full tensor: drop PEFT wrappers and the adapter name that follows `modules_to_save`.
    kept: list[str] = []
    skip_next = False
    for part in parts:
        if skip_next:
            skip_next = False
            continue
        if part == "modules_to_save":
            skip_next = True
            continue
        if part in WRAPPERS:
            continue
        kept.append(part)
    return SplitKey(key, ".".join(kept[:-1]), kept[-1])


@dataclass(frozen=True)
class Placement:
    key: SplitKey
    module: str  # runtime module path
    layout: str  # which layout placed it: 'runtime', 'original' or a foreign layout name

    @property
    def target(self) -> str:
        """The runtime parameter this tensor adds to (LoRA) or replaces (full tensor)."""
        return f"{self.module}.weight" if self.key.is_lora else f"{self.module}.{self.key.slot}"


def candidate_layouts(family: Family) -> list[tuple[str, KeyTable]]:
    return family.key_layouts()


def place(
    keys: Iterable[str], family: Family, base_params: Mapping[str, object], source: str
) -> list[Placement]:
    """Place every key on the base (runtime parameter names -> anything); raise naming all that fail.

    `source` names the file the keys came from, for the message.
    """
    placements: list[Placement] = []
    unplaced: list[SplitKey] = []
    layouts = candidate_layouts(family)
    for key in keys:
        split = split_key(key)
        written = split.written
        for layout, table in layouts:
            target = table.to_runtime(written)
            if target in base_params:
                placements.append(Placement(split, target.rsplit(".", 1)[0], layout))
                break
        else:
            unplaced.append(split)
    if unplaced:
        raise AdapterError(diagnose(unplaced, family, base_params, source))
    seen: dict[tuple[str, str], str] = {}
    for p in placements:
        slot_id = (p.module, p.key.slot)
        if slot_id in seen:
            raise AdapterError(
                f"{source}: keys {seen[slot_id]!r} and {p.key.source!r} both land on {p.module} ({p.key.slot}); "
                "the file mixes two key layouts of the same weight. Keep one of them."
            )
        seen[slot_id] = p.key.source
    return placements


def diagnose(unplaced: list[SplitKey], family: Family, base_params: Mapping[str, object], source: str) -> str:
    """A message that names the keys, the likely cause and the fix."""
    shown = ", ".join(k.source for k in unplaced[:5])
    if len(unplaced) > 5:
        shown += f" (and {len(unplaced) - 5} more)"
    base_modules = {n.rsplit(".", 1)[0] for n in base_params}
    containers = {m.rsplit(".", 1)[0] for m in base_modules} | base_modules
    renamed, foreign = [], []
    for key in unplaced:
        parent = key.module.rsplit(".", 1)[0]
        placed_parent = any(
            table.to_runtime(parent + ".x").rsplit(".", 1)[0] in containers
            for _, table in candidate_layouts(family)
        )
        (renamed if placed_parent else foreign).append(key)
    if renamed and not foreign:
        k = renamed[0]
        cause = (
            f"the base has the parent module of {k.module!r} but no {k.module.rsplit('.', 1)[-1]!r} inside it: a renamed "
            "key, or an adapter for a model with other layer names"
        )
        fix = "rename the keys to the base's module names, or pass the base the adapter was trained on"
    else:
        k = foreign[0]
        roots = sorted({".".join(n.split(".")[:2]) for n in base_params})
        cause = (
            f"{k.module!r} lies under a module the {family.name} base does not have (its top-level modules are "
            f"{', '.join(roots[:6])}): the adapter was made for another model family, or saved in a key layout "
            "vlmtune does not know"
        )
        fix = "pass the base model the adapter was trained on (see its adapter_config.json / vlmtune.json)"
    return f"{source}: {len(unplaced)} adapter tensor(s) cannot be placed on the base: {shown}. Cause: {cause}. Fix: {fix}."
