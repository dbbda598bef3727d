"""Which modules get LoRA and which are trained fully: presets, role switches, explicit regexes, dry run.

Targets are resolved here, against the real module tree (or its meta-device twin), before PEFT sees them:
PEFT receives one anchored regex (its `target_modules` string is a `re.fullmatch` on the full module path),
never suffix names, because vision towers reuse the language model's leaf names (FIELD_NOTES §1). Every
setting must select something: a role switch or a regex that matches nothing is an error, not a no-op.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import VlmtuneError
from ..families import Family

PRESETS: dict[str, tuple[str, ...]] = {
    "language": ("language",),
    "language+vision": ("language", "vision"),
    "language+vision+projector": ("language", "vision", "projector"),
}
# PEFT's marker for an adapter with no LoRA layer (only `modules_to_save`), e.g. projector-only stage 1.
NO_LORA_TARGETS = "dummy-target-modules"


class TargetError(VlmtuneError, ValueError):
    """A target setting that selects nothing, contradicts another, or cannot be trained."""


@dataclass
class TargetPlan:
    """The resolved trainable set, by role, with parameter counts computed from module shapes."""

    family: str
    target_regex: str  # the PEFT `target_modules` string (NO_LORA_TARGETS when there is no LoRA layer)
    lora_modules: list[str] = field(default_factory=list)
    full_modules: list[str] = field(default_factory=list)  # PEFT `modules_to_save`
    # Bare parameters trained in full (`Family.bare_parameters` among the projector's): made trainable
    # beside PEFT and saved under PEFT's key for them, `base_model.model.<name>` (see adapters.save).
    bare_parameters: list[str] = field(default_factory=list)
    lora_roles: dict[str, list[str]] = field(default_factory=dict)
    full_roles: dict[str, list[str]] = field(default_factory=dict)
    lora_params: dict[str, int] = field(default_factory=dict)
    full_params: dict[str, int] = field(default_factory=dict)

    @property
    def trainable_params(self) -> int:
        return sum(self.lora_params.values()) + sum(self.full_params.values())

    @property
    def targets_by_role(self) -> dict[str, int]:
        return {role: len(names) for role, names in self.lora_roles.items()}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trainable_params"] = self.trainable_params
        return out

    def render(self) -> str:
        """The dry-run listing: per role, module groups (layer numbers folded) and parameter counts."""
        lines = [f"family: {self.family}", f"LoRA target regex: {self.target_regex}"]
        for title, roles, params in (
            ("LoRA", self.lora_roles, self.lora_params),
            ("trained fully (modules_to_save)", self.full_roles, self.full_params),
        ):
            if not roles:
                lines.append(f"{title}: none")
                continue
            lines.append(f"{title}:")
            for role, names in roles.items():
                lines.append(f"  {role}: {len(names)} modules, {params[role]:,} trainable parameters")
                for pattern, count in fold_layer_numbers(names):
                    lines.append(f"    {pattern}" + (f"  x{count}" if count > 1 else ""))
        lines.append(f"trainable parameters: {self.trainable_params:,}")
        return "\n".join(lines)


def fold_layer_numbers(names: list[str]) -> list[tuple[str, int]]:
    """`layers.0.q`, `layers.1.q` -> (`layers.*.q`, 2), in first-seen order."""
    counts = Counter(re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names)
    return list(counts.items())


def plan_targets(
    model: Any,
    family: Family,
    targets: str | list[str] = "language",
    projector: str = "frozen",
    vision: str | None = None,
    language: str = "lora",
    r: int = 8,
    dora: bool = False,
) -> TargetPlan:
    """Resolve LoRA targets and fully trained modules on `model` (runtime module names)."""
    import torch

    modules = dict(model.named_modules())
    explicit = not (isinstance(targets, str) and targets in PRESETS)
    if explicit:
        regex = _explicit_regex(targets, modules, family)
        _reject_role_switches(targets, vision, projector, language)
    else:
        regex = _preset_regex(str(targets), family, projector, vision, language)

    lora_modules: list[str] = []
    if regex is not None:
        pattern = re.compile(regex)
        for name, module in modules.items():
            if name and pattern.fullmatch(name):
                if not isinstance(module, torch.nn.Linear):
                    raise TargetError(
                        f"lora.targets selects {name} ({type(module).__name__}); LoRA targets must be Linear "
                        "layers here. Narrow the regex."
                    )
                lora_modules.append(name)
        if not lora_modules:
            raise TargetError(
                f"the LoRA target regex {regex!r} matches no Linear layer of this {family.name} model."
            )

    full_modules = _full_modules(family, modules) if projector == "full" else []
    params = dict(model.named_parameters())
    bare = [p for p in family.prefixes_of("projector") if p in family.bare_parameters and p in params]
    bare = bare if projector == "full" else []
    overlap = [n for n in lora_modules if any(n == f or n.startswith(f + ".") for f in full_modules)]
    if overlap:
        raise TargetError(
            f"lora.targets puts LoRA inside the projector, which projector: full trains fully ({overlap[0]}); "
            "exclude it from the regex or use projector: lora."
        )
    if not lora_modules and not full_modules:
        raise TargetError(
            "nothing would be trained: language frozen, vision frozen and projector frozen; "
            "set language: lora, vision: lora, or projector: lora|full."
        )

    plan = TargetPlan(family.name, regex if lora_modules else NO_LORA_TARGETS)
    for name in lora_modules:
        role = family.role_of(name) or "other"
        module = modules[name]
        plan.lora_modules.append(name)
        plan.lora_roles.setdefault(role, []).append(name)
        extra = module.out_features if dora else 0  # DoRA's magnitude vector
        plan.lora_params[role] = (
            plan.lora_params.get(role, 0) + r * (module.in_features + module.out_features) + extra
        )
    for name in full_modules:
        role = family.role_of(name) or "other"
        plan.full_modules.append(name)
        plan.full_roles.setdefault(role, []).append(name)
        count = sum(p.numel() for p in modules[name].parameters())
        plan.full_params[role] = plan.full_params.get(role, 0) + count
    for name in bare:
        role = family.role_of(name) or "other"
        plan.bare_parameters.append(name)
        plan.full_roles.setdefault(role, []).append(name)
        plan.full_params[role] = plan.full_params.get(role, 0) + params[name].numel()
    return plan


def _preset_regex(
    preset: str, family: Family, projector: str, vision: str | None, language: str
) -> str | None:
    roles = list(PRESETS[preset])
    if vision == "frozen" and "vision" in roles:
        raise TargetError(
            f"lora.targets {preset!r} puts LoRA on the vision tower but vision: frozen; drop one of them."
        )
    if projector in ("frozen", "full") and "projector" in roles:
        raise TargetError(
            f"lora.targets {preset!r} puts LoRA on the projector but projector: {projector}; drop one of them."
        )
    if vision == "lora" and "vision" not in roles:
        roles.append("vision")
    if projector == "lora" and "projector" not in roles:
        roles.append("projector")
    if language == "frozen":
        roles.remove("language")
    for role in roles:
        if role not in family.lora_target_patterns:
            switch = "projector" if role == "projector" else role
            raise TargetError(
                f"{family.name}'s {role} has no Linear layer LoRA can target, so {switch}: lora would do "
                f"nothing; use {'projector: full or frozen' if role == 'projector' else f'{switch}: frozen'}."
            )
    return family.lora_target_regex(roles) if roles else None


def _explicit_regex(targets: str | list[str], modules: dict[str, Any], family: Family) -> str:
    """One regex from an explicit regex or list; every entry must match some module by its full name."""
    entries = [targets] if isinstance(targets, str) else list(targets)
    if not entries:
        raise TargetError(
            "lora.targets is an empty list; name modules or use a preset (language, language+vision)."
        )
    names = [n for n in modules if n]
    for entry in entries:
        try:
            pattern = re.compile(entry)
        except re.error as exc:
            raise TargetError(
                f"lora.targets entry {entry!r} is neither a preset ({', '.join(PRESETS)}) nor a valid regex ({exc})."
            ) from None
        if any(pattern.fullmatch(n) for n in names):
            continue
        suffix = [n for n in names if n.endswith("." + entry)]
        hint = ""
        if suffix:
            roles = sorted({family.role_of(n) or "other" for n in suffix})
            hint = (
                f"; as a suffix it would hit {len(suffix)} modules in {', '.join(roles)} (vision towers reuse "
                f"language leaf names). Write a full-path regex, e.g. {family.lora_target_patterns['language']!r}"
            )
        raise TargetError(
            f"lora.targets entry {entry!r} matches no module by full name (targets are re.fullmatch'ed "
            f"against names like {_example(names, family)!r}){hint}; presets: {', '.join(PRESETS)}."
        )
    return entries[0] if len(entries) == 1 else "|".join(f"(?:{e})" for e in entries)


def _example(names: list[str], family: Family) -> str:
    pattern = re.compile(family.lora_target_patterns["language"])
    return next((n for n in names if pattern.fullmatch(n)), names[-1])


def _reject_role_switches(
    targets: str | list[str], vision: str | None, projector: str, language: str
) -> None:
    clashes = []
    if vision is not None:
        clashes.append(f"vision: {vision}")
    if projector == "lora":
        clashes.append("projector: lora")
    if language == "frozen":
        clashes.append("language: frozen")
    if clashes:
        raise TargetError(
            f"lora.targets is an explicit regex/list ({targets!r}), so {', '.join(clashes)} would be ignored; "
            "write those modules into the regex instead, or use a preset."
        )


def _full_modules(family: Family, modules: dict[str, Any]) -> list[str]:
    """The projector's top modules (PEFT `modules_to_save` entries) that exist in this model. A container
    (e.g. Qwen3-VL's `deepstack_merger_list`, a ModuleList PEFT cannot wrap) stands for its children."""
    import torch

    prefixes = [p for role, p in family.role_prefixes if role == "projector"]
    present = []
    for p in (p for p in prefixes if p in modules):
        if isinstance(modules[p], (torch.nn.ModuleList, torch.nn.ModuleDict)):
            present += [f"{p}.{child}" for child, _ in modules[p].named_children()]
        else:
            present.append(p)
    if not present:
        raise TargetError(
            f"{family.name}: no projector module found ({', '.join(prefixes)}); projector: full would do nothing."
        )
    return present
