"""Read any adapter folder into one canonical form, placed strictly on a base.

Formats: PEFT standard (ours, LLaMA-Factory, ms-swift, VLM-R1, TRL: `adapter_config.json` +
`adapter_model.safetensors|bin`) and the foreign formats families declare (e.g. original LLaVA training
outputs: the same plus `non_lora_trainables.bin` and a LLaVA `config.json`). The result, `Adapter`, says per base module what
the adapter does (LoRA factors with their own rank/alpha/scaling, DoRA magnitude, LoRA bias) and which
base tensors it replaces outright. Inference turns it into a PEFT model; the merge applies it to shards.
No torch import unless a pickled file must be read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..families import Family
from ..io import TensorRecord
from . import rules
from .files import read_files
from .layout import AdapterError, Placement, place
from .manifest import Manifest, made_for
from .rules import Finding, Use


@dataclass
class LoraModule:
    """The LoRA of one base module: delta = scaling * (B @ A) (+ `bias`), or DoRA with `magnitude`."""

    module: str  # runtime module path
    kind: str  # 'linear' | 'embedding' | 'conv'
    A: TensorRecord
    B: TensorRecord
    r: int
    alpha: float
    scaling: float
    bias: TensorRecord | None = None
    magnitude: TensorRecord | None = None
    fan_in_fan_out: bool = False


@dataclass
class Adapter:
    path: Path
    format: str  # 'peft' or a foreign format's name (e.g. 'llava')
    config: dict[str, Any]  # adapter_config.json as written
    lora: dict[str, LoraModule]  # runtime module path -> LoRA
    full: dict[str, TensorRecord]  # runtime parameter name -> tensor that replaces it
    layouts: set[
        str
    ]  # key layouts seen: 'runtime', 'original', or a foreign format's (e.g. 'llava_original')
    manifest: Manifest | None = None
    files: list[Path] = field(default_factory=list)
    # The adapter rules that apply (see `rules.RULES`), and the messages of those this use warns about.
    findings: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unchanged_copies: list[str] = field(default_factory=list)  # base weights saved as they are: dropped
    # The family's bare parameters (`Family.bare_parameters`): those of `full` are in `bare`, not in
    # `full_modules`.
    bare_names: tuple[str, ...] = ()

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.lora.values())

    @property
    def bare(self) -> dict[str, TensorRecord]:
        """Replaced bare parameters (LLaVA-NeXT's `model.image_newline`): no module of their own that PEFT's
        `modules_to_save` could wrap (their parent is the whole model), so they never reach PEFT's config;
        plain PEFT loads them from the file into the base parameter, un-merged inference keeps them as
        per-adapter overrides, and the merge writes them like any other full tensor."""
        return {name: t for name, t in self.full.items() if name in self.bare_names}

    @property
    def full_modules(self) -> list[str]:
        """The modules whose tensors the adapter replaces (PEFT `modules_to_save`): a module that holds a
        parameter of its own (Gemma 3's projector weight) stands for its sub-modules too, as PEFT wrapped it.
        Bare parameters (`bare`) are not among them."""
        names = sorted({name.rsplit(".", 1)[0] for name in self.full if name not in self.bare_names})
        return [n for n in names if not any(n.startswith(m + ".") for m in names)]


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule (`peft.utils.other.get_pattern_key`): the first pattern that matches a suffix of the
    module path wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(
    path: str | Path,
    family: Family,
    base_params: Mapping[str, tuple[int, ...]],
    base_config: Mapping[str, Any] | None = None,
    *,
    use: Use,
    base_fingerprint: str | None = None,
    base_values: Callable[[str], Any] | None = None,
) -> Adapter:
    """Read and strictly place an adapter folder on a base, and apply every adapter rule (`rules.RULES`)
    for `use`: 'unmerged' (predict, chat, serve), 'merge', or 'inspect' (nothing refused; the findings
    are kept on the adapter for the report).

    `base_params` maps every runtime parameter name of the base to its logical shape ((out, in) for a
    Linear even when quantized). Raises before anything is loaded into a model when a key cannot be placed,
    a shape does not fit, or a rule refuses the adapter for `use`. `base_fingerprint` and `base_values`
    (runtime name -> values) let the rules that need them run; base weights the adapter saved unchanged
    beside its LoRA factors are dropped, whatever the use.
    """
    found = read_files(path)
    folder, config, manifest, tensors = found.folder, found.config, found.manifest, found.tensors
    ctx = rules.Context(found, family, base_params, dict(base_config or {}), base_fingerprint, base_values)
    findings = rules.evaluate("files", ctx)
    rules.enforce(findings, use)
    placements = place(tensors, family, base_params, source=str(folder))
    adapter = Adapter(
        folder,
        found.format,
        config,
        {},
        {},
        {p.layout for p in placements},
        manifest,
        found.files,
        bare_names=family.bare_parameters,
    )
    build_modules(adapter, placements, tensors, base_params)
    ctx.adapter = adapter
    findings += rules.evaluate("placed", ctx)
    adapter.findings = findings
    adapter.warnings = rules.enforce(findings, use)
    if base_values is not None:
        for name in rules.base_copies(adapter):
            if rules.copy_is_unchanged(adapter, name, base_values):
                del adapter.full[name]
                adapter.unchanged_copies.append(name)
    return adapter


def build_modules(
    adapter: Adapter,
    placements: list[Placement],
    tensors: Mapping[str, TensorRecord],
    base_params: Mapping[str, tuple[int, ...]],
) -> None:
    config = adapter.config
    declared = made_for(config, adapter.manifest)
    source = f"{adapter.path} (made for {declared})" if declared else str(adapter.path)
    grouped: dict[str, dict[str, TensorRecord]] = {}
    written: dict[str, str] = {}
    for p in placements:
        t = tensors[p.key.source]
        if p.key.is_lora:
            grouped.setdefault(p.module, {})[p.key.slot] = t
            written[p.module] = p.key.module
        else:
            shape = tuple(base_params[p.target])
            if tuple(t.shape) != shape:
                raise AdapterError(
                    f"{source}: {p.key.source} has shape {tuple(t.shape)} but the base's {p.target} is {shape}; "
                    "the adapter was made for a base of another size (a different checkpoint or vocabulary)."
                )
            adapter.full[p.target] = t
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for module, slots in grouped.items():
        kind = "embedding" if "lora_embedding_A" in slots else "linear"
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B")
            if kind == "embedding"
            else ("lora_A.weight", "lora_B.weight")
        )
        if a_key not in slots or b_key not in slots:
            missing = a_key if a_key not in slots else b_key
            raise AdapterError(
                f"{source}: {written[module]} has no {missing}; the adapter file is incomplete."
            )
        A, B = slots[a_key], slots[b_key]
        if len(A.shape) > 2:
            kind = "conv"
        name_in_file = written[module]
        r = int(pattern_value(rank_pattern, name_in_file, config.get("r", 8)))
        alpha = float(pattern_value(alpha_pattern, name_in_file, config.get("lora_alpha", r)))
        rows = A.shape[0]
        if rows != r or B.shape[1] != rows:
            raise AdapterError(
                f"{source}: {written[module]} has rank {rows} in its tensors (lora_A {tuple(A.shape)}, lora_B "
                f"{tuple(B.shape)}) but adapter_config.json says r={r}; the config and weights come from different "
                "runs. Use the adapter_config.json saved with these weights."
            )
        check_shapes(
            source,
            written[module],
            module,
            kind,
            A,
            B,
            tuple(base_params[f"{module}.weight"]),
            bool(config.get("fan_in_fan_out")),
        )
        check_sizes(
            source,
            written[module],
            kind,
            tuple(base_params[f"{module}.weight"]),
            bool(config.get("fan_in_fan_out")),
            {"DoRA magnitude": slots.get("lora_magnitude_vector"), "lora_B bias": slots.get("lora_B.bias")},
        )
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        adapter.lora[module] = LoraModule(
            module,
            kind,
            A,
            B,
            r,
            alpha,
            scaling,
            bias=slots.get("lora_B.bias"),
            magnitude=slots.get("lora_magnitude_vector"),
            fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        )


def check_shapes(
    source: str,
    written: str,
    module: str,
    kind: str,
    A: TensorRecord,
    B: TensorRecord,
    weight: tuple[int, ...],
    fan_in_fan_out: bool,
) -> None:
    if kind == "embedding":
        want_in, want_out = weight[0], weight[1]
        got_in, got_out = A.shape[1], B.shape[0]
    elif kind == "conv":
        want_in, want_out = weight[1], weight[0]
        got_in, got_out = A.shape[1], B.shape[0]
    else:
        out_f, in_f = (weight[1], weight[0]) if fan_in_fan_out else (weight[0], weight[1])
        want_in, want_out = in_f, out_f
        got_in, got_out = A.shape[1], B.shape[0]
    if (got_in, got_out) != (want_in, want_out):
        raise AdapterError(
            f"{source}: {written} expects a layer of {got_in} -> {got_out} features (lora_A {tuple(A.shape)}, "
            f"lora_B {tuple(B.shape)}), but the base's {module} is {want_in} -> {want_out} (weight {weight}); "
            "the adapter was made for another base size. Pass the base it was trained on."
        )


def check_sizes(
    source: str,
    written: str,
    kind: str,
    weight: tuple[int, ...],
    fan_in_fan_out: bool,
    extras: Mapping[str, TensorRecord | None],
) -> None:
    """A DoRA magnitude and a LoRA bias hold one value per output feature of the layer (an embedding's
    magnitude: one per embedding dimension); a wrong count is another base's adapter, for every use."""
    want = weight[1] if kind == "embedding" or (kind == "linear" and fan_in_fan_out) else weight[0]
    for what, t in extras.items():
        if t is not None and t.numel != want:
            raise AdapterError(
                f"{source}: {written} has a {what} of shape {tuple(t.shape)}, but the base layer (weight "
                f"{weight}) has {want} output features; the adapter was made for another base size."
            )


def base_params_from_folder(
    folder: str | Path, family: Family, config: Mapping[str, Any]
) -> dict[str, tuple[int, ...]]:
    """Runtime parameter name -> shape for a model folder, from its safetensors headers alone.

    A tied lm_head is not stored on disk; it is listed with the embedding's shape so adapters that
    train or LoRA it can be placed (the merge then writes it untied).
    """
    from ..checkpoint import tensor_index
    from ..families import tied_embeddings

    index = tensor_index(folder)
    params = {family.to_runtime(name): info.shape for name, info in index.items()}
    head, embed = f"{family.prefix_of('lm_head')}.weight", f"{family.prefix_of('embeddings')}.weight"
    if head not in params and tied_embeddings(dict(config)) and embed in params:
        params[head] = params[embed]
    return params


def base_values_from_folder(
    folder: str | Path, family: Family, config: Mapping[str, Any]
) -> Callable[[str], Any]:
    """Runtime parameter name -> float32 numpy values, read from the folder's safetensors on demand (for
    the rules that compare a saved copy with the base; a tied lm_head reads the embedding)."""
    from ..checkpoint import tensor_index
    from ..families import tied_embeddings

    index = {family.to_runtime(name): record for name, record in tensor_index(folder).items()}
    head, embed = f"{family.prefix_of('lm_head')}.weight", f"{family.prefix_of('embeddings')}.weight"
    if head not in index and tied_embeddings(dict(config)) and embed in index:
        index[head] = index[embed]
    return lambda name: index[name].numpy()


def base_params_from_model(model: Any) -> dict[str, tuple[int, ...]]:
    """Runtime parameter name -> logical shape for a loaded model (quantized Linear layers report
    (out_features, in_features), not their packed storage shape)."""
    params = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    for name, module in model.named_modules():
        if hasattr(module, "in_features") and hasattr(module, "out_features") and f"{name}.weight" in params:
            params[f"{name}.weight"] = (module.out_features, module.in_features)
    return params
