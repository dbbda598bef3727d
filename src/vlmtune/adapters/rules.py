"""Every rule about what an adapter folder may do, declared once: `RULES` below is the table (rule ->
verdict per use), and `read_adapter(..., use=...)` is the only place it is applied, so `predict`/`chat`/
`serve` (use 'unmerged'), `merge` (use 'merge') and `inspect` (which reports both columns) give the same
verdict for the same folder.

A verdict is 'refuse' (a one-line error, before anything is loaded or written), 'warn' (the adapter is used
and the message is kept on it), or 'accept'. Where the columns differ it is because one use can do what the
other cannot: un-merged inference keeps the base shared by every loaded adapter, so it cannot apply an
adapter that replaces base weights; the merge has no closed form for some layers PEFT runs un-merged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import VlmtuneError
from ..families import Family
from ..io import read_json

if TYPE_CHECKING:
    from .files import AdapterFiles
    from .reader import Adapter

Use = Literal["unmerged", "merge", "inspect"]
Verdict = Literal["refuse", "warn", "accept"]
APPLYING_USES: tuple[Use, ...] = ("unmerged", "merge")  # inspect applies nothing; it reports these two

# adapter_config.json settings that change what the weights mean and that vlmtune does not implement.
# (Each must be absent, None, False or empty.)
UNSUPPORTED_SETTINGS = {
    "target_parameters": "LoRA on raw parameters (MoE experts)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
}
# init_lora_weights values whose initialisation rewrites the base weights (PiSSA/OLoRA/CorDA: W <- W - B0 A0;
# LoftQ/LoRA-GA replace W): an adapter saved without PEFT's conversion to plain LoRA is only right on that
# modified base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# A saved base weight counts as unchanged within this tolerance (copies are often saved in another dtype).
COPY_RTOL, COPY_ATOL = 1e-2, 1e-3


class AdapterRefusedError(VlmtuneError):
    """A rule refuses the adapter for this use; the message says why and what to do."""


@dataclass
class Context:
    """What a rule may look at: the folder as read, the base it is placed on, and (for rules of the
    'placed' stage) the placed adapter. `base_values` reads a base parameter's values by runtime name
    (None where only shapes are known, e.g. from safetensors headers)."""

    files: AdapterFiles
    family: Family | None  # None only where no rule that needs the base runs (inspect without --base)
    base_params: Mapping[str, tuple[int, ...]]
    base_config: Mapping[str, Any]
    base_fingerprint: str | None = None
    base_values: Callable[[str], Any] | None = None
    adapter: Adapter | None = None

    @property
    def config(self) -> dict[str, Any]:
        return self.files.config

    @property
    def where(self) -> Path:
        return self.files.folder


@dataclass(frozen=True)
class Rule:
    name: str
    unmerged: Verdict
    merge: Verdict
    stage: Literal["files", "placed"]  # 'files': checked before placement (so it wins over key errors)
    check: Callable[[Context], Iterator[str]]  # one message per violation
    needs_base: bool = False  # meaningless without the base (inspect with no --base skips it)


@dataclass(frozen=True)
class Finding:
    """One rule that applies to an adapter, with its message and its verdict for each use."""

    rule: str
    message: str
    unmerged: Verdict
    merge: Verdict

    def verdict(self, use: Use) -> Verdict:
        return "accept" if use == "inspect" else getattr(self, use)

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "unmerged": self.unmerged, "merge": self.merge, "message": self.message}


# -- the checks ---------------------------------------------------------------------------------------------


def _peft_type(ctx: Context) -> Iterator[str]:
    peft_type = str(ctx.config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        yield f"{ctx.where}: peft_type {peft_type} is not supported; vlmtune handles LoRA (incl. DoRA, rsLoRA)."


def _unsupported_setting(ctx: Context) -> Iterator[str]:
    for key, what in UNSUPPORTED_SETTINGS.items():
        if ctx.config.get(key) not in (None, False, {}, [], ""):
            yield f"{ctx.where}: {key} ({what}) is set; vlmtune cannot apply it faithfully, so it refuses the adapter."


def _base_rewriting_init(ctx: Context) -> Iterator[str]:
    init = ctx.config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        yield (
            f"{ctx.where}: init_lora_weights={init!r}: that initialisation rewrites the base weights (for PiSSA, "
            "OLoRA and CorDA it subtracts the initial factors from the base weights; LoftQ and LoRA-GA replace "
            "them), so these factors are only right on that modified base. Convert the adapter to a plain LoRA "
            "first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        )


def _trained_family(ctx: Context) -> Iterator[str]:
    manifest = ctx.files.manifest
    if manifest is not None and manifest.base.family != ctx.family.name:
        yield (
            f"{ctx.where} was trained on a {manifest.base.family} model ({manifest.base.name_or_path}) but the "
            f"base is a {ctx.family.name} model; pass the base it was trained on."
        )


def _declared_family(ctx: Context) -> Iterator[str]:
    if ctx.files.manifest is not None:
        return  # the manifest says what it was trained on (rule trained_family)
    declared = declared_family(ctx.where, ctx.config)
    if declared is not None and declared.name != ctx.family.name:
        yield (
            f"{ctx.where} was made for {ctx.config.get('base_model_name_or_path')}, a {declared.name} model, but "
            f"the base is a {ctx.family.name} model; pass the base it was trained on."
        )


def _fan_in_fan_out_linear(ctx: Context) -> Iterator[str]:
    # transformers' Conv1D (weights stored (in, out)) is the only layer the flag is for; the families here
    # build every 2-D LoRA target as nn.Linear, for which PEFT resets the flag to False when it builds the
    # layer. Un-merged PEFT would then ignore it while a merge honouring it transposes the update: two
    # models from one folder. Neither reading is safe to pick silently.
    if not ctx.config.get("fan_in_fan_out"):
        return
    linear = [k for k, t in ctx.files.tensors.items() if k.endswith("lora_A.weight") and len(t.shape) == 2]
    if linear:
        yield (
            f"{ctx.where}: fan_in_fan_out=True, but its LoRA layers are nn.Linear ({linear[0]}, ...), for which PEFT "
            "ignores the flag, so the folder means one model un-merged and another merged. If it was trained with "
            "PEFT on this model, set fan_in_fan_out to false in adapter_config.json."
        )


def _foreign_format(ctx: Context) -> Iterator[str]:
    """A folder in a tool's own format (declared by a family, e.g. LLaVA training outputs) loads onto that
    family's bases only, and only when the tool's settings fit the base (the format's own check)."""
    foreign = ctx.files.foreign
    if foreign is None:
        return
    if foreign not in ctx.family.foreign_formats:
        owner = ctx.files.foreign_family.name if ctx.files.foreign_family else "another"
        yield (
            f"{ctx.where} is {foreign.what}, but the base is a {ctx.family.name} model; such outputs load onto a "
            f"{owner} base."
        )
    elif foreign.check is not None:
        try:
            foreign.check(ctx.files.foreign_config, dict(ctx.base_config), ctx.base_params, ctx.where)
        except VlmtuneError as exc:
            yield str(exc)


def _trained_biases(ctx: Context) -> Iterator[str]:
    bias = ctx.config.get("bias", "none")
    if bias not in (None, "none"):
        yield (
            f"{ctx.where}: adapter_config.json has bias={bias!r} (trained base biases), which would change the base "
            "under every loaded adapter; un-merged inference cannot apply it. Merge the adapter into the base "
            "(`vlmtune merge`) instead."
        )


def _changed_base_copy(ctx: Context) -> Iterator[str]:
    assert ctx.adapter is not None
    for name in base_copies(ctx.adapter):
        if ctx.base_values is not None and not copy_is_unchanged(ctx.adapter, name, ctx.base_values):
            yield (
                f"{ctx.where}: the adapter replaces the base weight {name} (saved beside its LoRA factors, e.g. a "
                "retrained or resized embedding), which would change the base under every adapter; un-merged "
                "inference cannot apply it. Merge the adapter (`vlmtune merge`) instead."
            )


def _ensure_weight_tying(ctx: Context) -> Iterator[str]:
    from ..families import tied_embeddings

    assert ctx.adapter is not None
    family = ctx.family
    tied = (f"{family.prefix_of('lm_head')}.weight", f"{family.prefix_of('embeddings')}.weight")
    touched = [f"{m}.weight" for m in ctx.adapter.lora] + list(ctx.adapter.full)
    if (
        tied_embeddings(dict(ctx.base_config))
        and ctx.config.get("ensure_weight_tying")
        and any(n in tied for n in touched)
    ):
        yield (
            f"{ctx.where}: ensure_weight_tying=True adapters of tied embeddings are not supported yet (PEFT then "
            "expects LoRA factors on lm_head that the file does not hold, and the merge cannot write them tied); "
            "train without ensure_weight_tying (the merge then writes lm_head untied)."
        )


def _lora_bias_without_base_bias(ctx: Context) -> Iterator[str]:
    assert ctx.adapter is not None
    for m in ctx.adapter.lora.values():
        if m.bias is not None and f"{m.module}.bias" not in ctx.base_params:
            yield (
                f"{ctx.where}: {m.module}: the adapter has lora_bias but the base layer has no bias, so there is "
                "nothing to merge it into (PEFT refuses this merge too); run it un-merged."
            )


def _conv_kernel(ctx: Context) -> Iterator[str]:
    assert ctx.adapter is not None
    for m in ctx.adapter.lora.values():
        if m.kind != "conv":
            continue
        weight = ctx.base_params.get(f"{m.module}.weight", ())
        if len(weight) < 3 or len(m.A.shape) != len(weight) or any(k != 1 for k in m.B.shape[2:]):
            yield (
                f"{ctx.where}: {m.module}: conv LoRA with lora_A {m.A.shape} / lora_B {m.B.shape} on a weight of "
                f"shape {weight} (grouped or non-1x1 lora_B) cannot be merged or run by PEFT."
            )


def _other_base_weights(ctx: Context) -> Iterator[str]:
    manifest = ctx.files.manifest
    made_for = manifest.base.fingerprint if manifest else None
    if made_for and ctx.base_fingerprint and made_for != ctx.base_fingerprint:
        yield (
            f"{ctx.where} was trained on {manifest.base.name_or_path} ({made_for}), and this base "  # type: ignore[union-attr]
            f"({ctx.base_fingerprint}) has the same shapes but other weights: outputs will differ from what the "
            "adapter learned unless this is the same model re-saved."
        )


# -- the table ---------------------------------------------------------------------------------------------

RULES: tuple[Rule, ...] = (
    #    rule                        unmerged  merge     stage
    Rule("peft_type", "refuse", "refuse", "files", _peft_type),
    Rule("unsupported_setting", "refuse", "refuse", "files", _unsupported_setting),
    Rule("base_rewriting_init", "refuse", "refuse", "files", _base_rewriting_init),
    Rule("trained_on_other_family", "refuse", "refuse", "files", _trained_family, needs_base=True),
    Rule("declared_base_other_family", "refuse", "refuse", "files", _declared_family, needs_base=True),
    Rule("foreign_format_mismatch", "refuse", "refuse", "files", _foreign_format, needs_base=True),
    Rule("fan_in_fan_out_on_linear", "refuse", "refuse", "files", _fan_in_fan_out_linear),
    Rule("trained_base_biases", "refuse", "accept", "files", _trained_biases),
    Rule("changed_base_weight_copy", "refuse", "accept", "placed", _changed_base_copy),
    Rule("ensure_weight_tying", "refuse", "refuse", "placed", _ensure_weight_tying),
    Rule("lora_bias_without_base_bias", "accept", "refuse", "placed", _lora_bias_without_base_bias),
    Rule("unmergeable_conv_kernel", "refuse", "refuse", "placed", _conv_kernel),
    Rule("trained_on_other_weights", "warn", "warn", "placed", _other_base_weights),
)


def evaluate(stage: str, ctx: Context, with_base: bool = True) -> list[Finding]:
    """Every finding of the rules of `stage`, in table order (`with_base=False`: only the rules that
    read the folder alone)."""
    return [
        Finding(rule.name, message, rule.unmerged, rule.merge)
        for rule in RULES
        if rule.stage == stage and (with_base or not rule.needs_base)
        for message in rule.check(ctx)
    ]


def enforce(findings: list[Finding], use: Use) -> list[str]:
    """Raise for the first finding `use` refuses; return the messages it warns about."""
    for f in findings:
        if f.verdict(use) == "refuse":
            raise AdapterRefusedError(f.message)
    return [f.message for f in findings if f.verdict(use) == "warn"]


def verdicts(findings: list[Finding]) -> dict[str, dict[str, Any]]:
    """Per applying use: 'refuse' / 'warn' / 'accept' and the messages behind it (for `inspect`)."""
    out = {}
    for use in APPLYING_USES:
        hits = [f for f in findings if f.verdict(use) != "accept"]
        verdict = "refuse" if any(f.verdict(use) == "refuse" for f in hits) else "warn" if hits else "accept"
        out[use] = {"verdict": verdict, "because": [f.message for f in hits]}
    return out


# -- helpers the rules share with the reader and inspect ----------------------------------------------------


def base_copies(adapter: Adapter) -> list[str]:
    """Base weights saved beside the LoRA factors of the same module (PEFT's `save_embedding_layers` for a
    LoRA-targeted embedding or lm_head; VLM-R1 adapters have one): a copy of the base, or a changed one."""
    return [n for n in adapter.full if n.rsplit(".", 1)[0] in adapter.lora]


def copy_is_unchanged(adapter: Adapter, name: str, base_values: Callable[[str], Any]) -> bool:
    import numpy as np

    saved = adapter.full[name].numpy()
    current = np.asarray(base_values(name), dtype=np.float32)
    return saved.shape == current.shape and bool(np.allclose(saved, current, rtol=COPY_RTOL, atol=COPY_ATOL))


def declared_family(folder: Path, config: Mapping[str, Any]) -> Family | None:
    """The family of the base an adapter says it was made for, when that base is a local folder (a PEFT
    `base_model_name_or_path`); None when unknown. Catches adapters of one family loaded on another whose
    language-model names happen to coincide."""
    from .. import families

    declared = config.get("base_model_name_or_path")
    if not declared:
        return None
    path = Path(str(declared)).expanduser()
    if not path.is_absolute():
        path = folder / path if (folder / path).is_dir() else path
    if not (path / "config.json").is_file():
        return None
    try:
        return families.detect(read_json(path / "config.json"))
    except (VlmtuneError, ValueError):
        return None
