"""Everything the merge decides before it writes a byte: what each output tensor is made of.

Validation lives here so that a merge that cannot be done faithfully fails before the output folder is
created: a quantized base, an adapter key that lands nowhere or twice, an adapter the rules of
`adapters.rules` refuse for use 'merge' (settings and layers we cannot merge), an output dtype that is not a
float type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoint, families
from ..adapters.reader import (
    Adapter,
    LoraModule,
    base_params_from_folder,
    base_values_from_folder,
    read_adapter,
)
from ..adapters.rules import AdapterRefusedError
from ..errors import VlmtuneError
from ..families import Family
from ..io import TensorRecord, dtypes
from .writer import Entry, parse_size, shard_names, split_shards

QUANTIZATION_KEYS = ("quantization_config", "compression_config")


class MergeError(VlmtuneError):
    """The merge cannot be done faithfully; nothing was written."""


@dataclass
class Step:
    """One thing an adapter does to one base tensor, applied in adapter order."""

    kind: str  # 'replace' (modules_to_save / LLaVA projector) | 'lora' (weight) | 'bias' (lora_bias)
    adapter: int
    lora: LoraModule | None = None
    tensor: TensorRecord | None = None


@dataclass
class OutTensor:
    """One tensor of the merged checkpoint: its on-disk name, the base bytes it starts from, its steps."""

    name: str
    runtime: str
    source: TensorRecord
    dtype: str
    steps: list[Step] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return self.source.numel * dtypes.itemsize(self.dtype)

    @property
    def is_copy(self) -> bool:
        """Untouched and same dtype: copied as raw bytes."""
        return not self.steps and self.dtype == self.source.dtype

    @property
    def entry(self) -> Entry:
        return Entry(self.name, self.dtype, self.shape, self.nbytes)


@dataclass
class Plan:
    base: Path
    config: dict[str, Any]
    family: Family
    layout: str
    adapters: list[Adapter]
    tensors: list[OutTensor]
    out_dtype: str | None  # None: each tensor keeps its dtype
    max_shard_size: int
    untie: bool  # write lm_head explicitly and set tie_word_embeddings false
    shards: list[list[OutTensor]] = field(default_factory=list)
    shard_files: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def counts(self) -> dict[str, int]:
        out = {"tensors": len(self.tensors), "merged": 0, "replaced": 0, "cast": 0, "copied": 0}
        for t in self.tensors:
            if any(s.kind in ("lora", "bias") for s in t.steps):
                out["merged"] += 1
            elif t.steps:
                out["replaced"] += 1
            elif t.is_copy:
                out["copied"] += 1
            else:
                out["cast"] += 1
        return out


def check_not_quantized(config: dict[str, Any], folder: Path) -> None:
    for level in (config, config.get("text_config") or {}):
        for key in QUANTIZATION_KEYS:
            q = level.get(key)
            if q:
                method = q.get("quant_method", "unknown") if isinstance(q, dict) else "unknown"
                raise MergeError(
                    f"{folder} is a quantized model ({key}: {method}); a LoRA cannot be merged into quantized "
                    "weights faithfully. Merge into the unquantized base; a QLoRA adapter merges into the "
                    "bf16/fp16 base it was quantized from."
                )


def check_output_location(out: Path, base: Path, adapters: Sequence[Path]) -> None:
    """Refuse an output that is, lies inside, or contains the base, or that is or contains an adapter:
    writing there (or replacing it with --overwrite) would destroy inputs."""
    o = out.expanduser().absolute().resolve()
    b = base.expanduser().resolve()
    if o == b or b in o.parents:
        raise MergeError(f"--out {out} is inside the base model folder {base}; choose a folder outside it.")
    if o in b.parents:
        raise MergeError(f"--out {out} contains the base model folder {base}; choose another folder.")
    for a in adapters:
        r = a.expanduser().resolve()
        if o == r or o in r.parents:
            raise MergeError(f"--out {out} is or contains the adapter folder {a}; choose another folder.")


def validate_lora(m: LoraModule, weight: TensorRecord, adapter: Adapter, bias: TensorRecord | None) -> None:
    where = f"{adapter.path}: {m.module}"
    if not dtypes.is_float(weight.dtype):
        raise MergeError(
            f"{where}: the base weight {weight.name} is stored as {weight.dtype}, not a float type (a quantized "
            "base?); merge into the unquantized base."
        )
    ndim = len(weight.shape)  # (conv kernels and lora_bias without a base bias: adapters.rules)
    if m.kind != "conv" and ndim != 2:
        raise MergeError(f"{where}: {m.kind} LoRA on a {ndim}-D weight {weight.shape} cannot be merged.")
    # (DoRA magnitude and lora_B bias sizes: adapters.reader.check_sizes, for every use)


def build_plan(
    base: Path,
    adapter_paths: Sequence[Path],
    dtype: str | None = "auto",
    max_shard_size: str | int = "5GB",
) -> Plan:
    """Read headers and adapters, validate everything, and decide every output tensor and shard."""
    try:
        out_dtype = dtypes.parse_name(dtype)
    except dtypes.DTypeError as exc:
        raise MergeError(str(exc)) from None
    max_bytes = parse_size(max_shard_size)
    if not adapter_paths:
        raise MergeError("pass at least one --adapter.")
    config = checkpoint.read_config(base)
    check_not_quantized(config, base)
    family = families.detect(config)
    index = checkpoint.tensor_index(base)
    try:
        runtime_to_disk = family.runtime_index(index)
    except ValueError as exc:
        raise MergeError(f"{base}: {exc}") from None
    layout = family.disk_layout(index)
    params = base_params_from_folder(base, family, config)
    fingerprint = checkpoint.fingerprint(base)
    values = base_values_from_folder(base, family, config)
    try:
        adapters = [
            read_adapter(
                p, family, params, config, use="merge", base_fingerprint=fingerprint, base_values=values
            )
            for p in adapter_paths
        ]
    except AdapterRefusedError as exc:
        raise MergeError(str(exc)) from None

    tied = families.tied_embeddings(config)
    head = f"{family.prefix_of('lm_head')}.weight"
    embed = f"{family.prefix_of('embeddings')}.weight"
    embed_info = index[runtime_to_disk[embed]] if embed in runtime_to_disk else None

    def info_of(runtime: str) -> TensorRecord | None:
        if tied and runtime == head and embed_info is not None:
            return embed_info  # a tied head *is* the embedding at run time, whatever else is stored
        disk = runtime_to_disk.get(runtime)
        return index[disk] if disk is not None else None

    steps: dict[str, list[Step]] = {}
    for i, a in enumerate(adapters):
        # Whole tensors first: a tensor the adapter stores whole (modules_to_save, or the embedding base
        # layer PEFT saves with `save_embedding_layers`) is what its own LoRA then applies to.
        for name, t in a.full.items():
            target = info_of(name)
            if target is None:
                raise MergeError(f"{a.path}: {name} is not stored in {base}.")
            if not (dtypes.is_float(t.dtype) and dtypes.is_float(target.dtype)) and t.dtype != target.dtype:
                raise MergeError(
                    f"{a.path}: {name} is {t.dtype} in the adapter but {target.dtype} in the base; refusing to "
                    "convert between integer and float tensors."
                )
            steps.setdefault(name, []).append(Step("replace", i, tensor=t))
        for module, m in a.lora.items():
            weight = info_of(f"{module}.weight")
            if weight is None:
                raise MergeError(f"{a.path}: {module}.weight is not stored in {base}.")
            validate_lora(m, weight, a, info_of(f"{module}.bias"))
            steps.setdefault(f"{module}.weight", []).append(Step("lora", i, lora=m))
            if m.bias is not None:
                steps.setdefault(f"{module}.bias", []).append(Step("bias", i, lora=m))

    untie = tied and (head in steps or embed in steps)

    def out_dtype_for(src: TensorRecord) -> str:
        return out_dtype if out_dtype and dtypes.is_float(src.dtype) else src.dtype

    tensors: list[OutTensor] = []
    for disk, src in index.items():
        runtime = family.to_runtime(disk)
        if untie and runtime == head and embed_info is not None:
            src = embed_info
        tensors.append(OutTensor(disk, runtime, src, out_dtype_for(src), steps.pop(runtime, [])))
    if untie and head not in runtime_to_disk:
        assert embed_info is not None
        name = family.to_disk(head, layout)  # the key table read backwards
        tensors.append(OutTensor(name, head, embed_info, out_dtype_for(embed_info), steps.pop(head, [])))
    if steps:  # every placed adapter tensor must have landed on an output tensor
        raise MergeError(f"adapter tensors for {sorted(steps)} found no tensor in {base}.")

    plan = Plan(base, config, family, layout, adapters, tensors, out_dtype, max_bytes, untie)
    by_name = {t.name: t for t in tensors}
    groups = split_shards([t.entry for t in tensors], max_bytes)
    plan.shards = [[by_name[e.name] for e in g] for g in groups]
    plan.shard_files = shard_names(len(groups))
    return plan
