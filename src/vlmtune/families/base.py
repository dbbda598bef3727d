"""What vlmtune knows about one model family, as plain data.

A `Family` never imports torch or transformers: the merge and `inspect` read it while working on
raw safetensors headers, and they must stay light. How to build a tiny checkpoint of a family is not
part of it (see `families.tiny_kit` and each family's `tiny.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError

# Roles every family maps its modules to. `embeddings` holds the input token embeddings; `lm_head` the
# output head (tied to the embeddings in some checkpoints).
ROLES = ("vision", "projector", "language", "embeddings", "lm_head")

# The Linear leaf names of a Llama-style decoder layer: attention projections and the gated MLP.
ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LEAVES = ("gate_proj", "up_proj", "down_proj")
DECODER_LINEAR_LEAVES = ATTENTION_LEAVES + MLP_LEAVES

# Processor outputs any tokenizer may give that line up with the tokens (batch, seq, ...).
TOKEN_ALIGNED_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids")


def under(name: str, prefix: str) -> bool:
    """Whether dotted `name` is `prefix` itself or lies inside it (`a.b` is under `a`, `ab` is not)."""
    return name == prefix or name.startswith(prefix + ".")


def alternation(names: Iterable[str]) -> str:
    """A regex matching any of `names` literally."""
    escaped = [n.replace(".", "\\.") for n in names]
    return escaped[0] if len(escaped) == 1 else "(?:" + "|".join(escaped) + ")"


# A Llama-style decoder layer: (sub-module, its Linear leaves).
DECODER_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attn", ATTENTION_LEAVES),
    ("mlp", MLP_LEAVES),
)


def roles(*, projector: str | tuple[str, ...], vision: str, language: str) -> tuple[tuple[str, str], ...]:
    """The role table every family here shares, most specific first: the projector prefixes (in some
    families they sit inside the vision tower), the vision tower, the language model's input embeddings, the
    language model, and the output head."""
    projectors = (projector,) if isinstance(projector, str) else projector
    return (
        *(("projector", p) for p in projectors),
        ("vision", vision),
        ("embeddings", f"{language}.embed_tokens"),
        ("language", language),
        ("lm_head", "lm_head"),
    )


def decoder_targets(layers: str, groups: Iterable[tuple[str, Iterable[str]]] = DECODER_GROUPS) -> str:
    """The LoRA target regex (re.fullmatch on runtime names) of a decoder's Linear layers: every
    `<layers>.N.<group>.<leaf>`. Anchored to the layer stack, so a vision tower reusing the same leaf
    names is never hit. Families whose layers differ pass their own groups (cross-attention, linear
    attention, a fused MLP)."""
    parts = [f"{alternation([module])}\\.{alternation(leaves)}" for module, leaves in groups]
    return f"{alternation([layers])}\\.\\d+\\.(?:{'|'.join(parts)})"


@dataclass(frozen=True)
class Rename:
    """One row of a key table: names under the `disk` prefix are stored for names under `runtime`.

    Prefixes are dotted paths (a whole parameter name is a prefix of itself). Names under one of the
    `unless` prefixes are already runtime names and are left alone.
    """

    disk: str
    runtime: str
    unless: tuple[str, ...] = ()

    def forward(self, name: str) -> str | None:
        if under(name, self.disk) and not any(under(name, u) for u in self.unless):
            return self.runtime + name[len(self.disk) :]
        return None

    def backward(self, name: str) -> str | None:
        return self.disk + name[len(self.runtime) :] if under(name, self.runtime) else None


@dataclass(frozen=True)
class KeyTable:
    """On-disk (or another tool's) names <-> runtime names, as data read in both directions.

    `to_runtime` applies the first row whose disk prefix takes the name (most specific rows first);
    names no row takes are runtime names already. `to_disk` lists every stored spelling of a runtime
    name that maps back to it, first row first.
    """

    renames: tuple[Rename, ...] = ()

    def to_runtime(self, name: str) -> str:
        for rename in self.renames:
            new = rename.forward(name)
            if new is not None:
                return new
        return name

    def to_disk(self, runtime: str) -> list[str]:
        out: list[str] = []
        for rename in self.renames:
            disk = rename.backward(runtime)
            if disk is not None and disk not in out and self.to_runtime(disk) == runtime:
                out.append(disk)
        if self.to_runtime(runtime) == runtime and runtime not in out:
            out.append(runtime)
        return out


IDENTITY = KeyTable()


@dataclass(frozen=True)
class ForeignFormat:
    """An adapter folder written by another tool in its own layout (e.g. original LLaVA training outputs).

    Told apart by its extra tensor files or by marker keys of the folder's `config.json` (never by the
    folder name); `keys` maps its module paths (after PEFT's `base_model.model.`) to runtime names;
    `check(foreign_config, base_config, base_params, folder)` raises when the tool's settings do not fit
    the base.
    """

    format: str  # the format name reports use
    layout: str  # the key-layout name reports use
    what: str  # how a message names such a folder
    keys: KeyTable
    extra_files: tuple[str, ...] = ()  # tensor files read beside adapter_model.*
    config_markers: tuple[str, ...] = ()  # keys of the folder's config.json that only this tool writes
    check: Callable[..., None] | None = None
    # Why vLLM cannot serve such a folder as it is, and what to do instead.
    vllm_problem: str = ""

    def detect(self, folder: Path, folder_config: Mapping[str, Any]) -> bool:
        return any((folder / f).is_file() for f in self.extra_files) or any(
            k in folder_config for k in self.config_markers
        )


class UnsupportedModelError(VlmtuneError, ValueError):
    """The model is not one of the families vlmtune knows."""


@dataclass(frozen=True)
class Family:
    """Model-family knowledge: roles, LoRA targets, key layouts, foreign formats, processor quirks.

    Prefixes and patterns use **runtime** names, the ones `model.named_modules()` gives in transformers 5.
    """

    name: str
    model_types: tuple[str, ...]
    architecture: str
    # (role, runtime prefix), most specific first: the first prefix that matches decides the role.
    role_prefixes: tuple[tuple[str, str], ...]
    # role -> regex (re.fullmatch on a runtime module name) selecting the Linear layers LoRA may target.
    lora_target_patterns: Mapping[str, str]
    # The hub's on-disk names <-> runtime names, as `from_pretrained` converts them.
    keys: KeyTable = IDENTITY
    # Adapter layouts of other tools that load onto this family.
    foreign_formats: tuple[ForeignFormat, ...] = ()
    # Why vLLM cannot serve this family at all ("" when it can).
    vllm_unsupported: str = ""
    # Why `vlmtune serve`'s continuous-batching scheduler cannot batch it ("" when it can); the scheduler
    # refuses such a model by its cache layers, this says so in the support table.
    serve_unsupported: str = ""
    # Whether lm_head can share the input embeddings (Mllama's embedding table has 8 extra rows: never).
    can_tie_embeddings: bool = True
    # Processor attributes that carry training-time image limits, if the family has them.
    image_limit_keys: tuple[str, ...] = ()
    # Bare `nn.Parameter`s (not inside a module PEFT could wrap) among the role prefixes, e.g. LLaVA-NeXT's
    # `model.image_newline`: PEFT `modules_to_save` takes modules only, so `projector: full` trains them beside
    # PEFT and stores them under PEFT's key `base_model.model.<name>` (adapters.save); adapters read them
    # apart (`Adapter.bare`): per-adapter overrides un-merged, full tensors for the merge.
    bare_parameters: tuple[str, ...] = ()
    # Processor outputs beyond TOKEN_ALIGNED_KEYS with one entry per token position (what truncation cuts).
    token_aligned_keys: tuple[str, ...] = ()
    # Whether the processor can batch rows without images together with rows that have images (Mllama's
    # cannot in transformers 5.23: its aspect-ratio tensors then cover only the image rows).
    mixed_image_batches: bool = True
    # Packed (padding-free) batches, see vlmtune.data.packing. How each sample's position ids are built:
    # "1d" (0..L-1 per sample; transformers' mask builders isolate samples where positions restart),
    # "rope_index" (Qwen-style multi-row rotary ids from `rope_index_model`'s own `get_rope_index`, per
    # sample, with the 1-D text row prepended so transformers still sees the restarts), or "" where the
    # family has no exact packed path; then `packing_unsupported` says why. Packing also assumes the
    # processor's non-token tensors (pixels, grids, sizes) concatenate along dim 0 across samples.
    packed_positions: str = ""
    # Runtime paths of the ModuleLists whose children are the model's blocks (decoder layers, vision
    # blocks): FSDP2 shards each child as its own unit, whatever its class (see vlmtune.training.distributed).
    # Blocks, never leaves: sharding a vision tower's Embedding alone breaks some forwards.
    block_lists: tuple[str, ...] = ()
    rope_index_model: str = ""
    packing_unsupported: str = "vlmtune has no verified exact packed path for it"

    # -- roles ---------------------------------------------------------------------------------------
    def role_of(self, name: str) -> str | None:
        """The role of a runtime module or parameter name, or None when it lies outside every role."""
        for role, prefix in self.role_prefixes:
            if under(name, prefix):
                return role
        return None

    def prefix_of(self, role: str) -> str:
        for r, prefix in self.role_prefixes:
            if r == role:
                return prefix
        raise KeyError(f"family {self.name} has no role {role!r}")

    def prefixes_of(self, role: str) -> list[str]:
        return [prefix for r, prefix in self.role_prefixes if r == role]

    def lora_target_regex(self, roles: Iterable[str]) -> str:
        """One anchored regex (PEFT `target_modules` string) for the LoRA-able Linear layers of `roles`."""
        parts = []
        for role in roles:
            if role not in self.lora_target_patterns:
                raise ValueError(
                    f"{self.name}: the {role} has no Linear layer LoRA can target; "
                    f"choose from {sorted(self.lora_target_patterns)}."
                )
            parts.append(self.lora_target_patterns[role])
        return parts[0] if len(parts) == 1 else "|".join(f"(?:{p})" for p in parts)

    @property
    def default_target_regex(self) -> str:
        """The anchors' default: LoRA on the language model's projections only."""
        return self.lora_target_patterns["language"]

    @property
    def all_token_aligned_keys(self) -> tuple[str, ...]:
        return TOKEN_ALIGNED_KEYS + self.token_aligned_keys

    # -- key layouts -----------------------------------------------------------------------------------
    def to_runtime(self, disk_name: str) -> str:
        """Map an on-disk parameter name (either layout) to its runtime name."""
        return self.keys.to_runtime(disk_name)

    def to_disk(self, runtime: str, layout: str) -> str:
        """The name a runtime parameter is stored under in a checkpoint of `layout` ('runtime'/'original')."""
        if layout == "runtime":
            return runtime
        return self.keys.to_disk(runtime)[0]

    def runtime_index(self, disk_names: Iterable[str]) -> dict[str, str]:
        """runtime name -> on-disk name for every tensor of a checkpoint; fails if two collide."""
        index: dict[str, str] = {}
        for disk in disk_names:
            runtime = self.to_runtime(disk)
            if runtime in index:
                raise ValueError(
                    f"checkpoint holds both {index[runtime]!r} and {disk!r}, which are the same weight "
                    f"({runtime!r}) in two layouts; remove one of them."
                )
            index[runtime] = disk
        return index

    def disk_layout(self, disk_names: Iterable[str]) -> str:
        """'runtime' when a checkpoint is stored under runtime names, else 'original' (the hub layout)."""
        names = list(disk_names)
        return "runtime" if all(self.to_runtime(n) == n for n in names) else "original"

    def key_layouts(self) -> list[tuple[str, KeyTable]]:
        """Every key layout an adapter for this family may use, tried in this order."""
        return [
            ("runtime", IDENTITY),
            ("original", self.keys),
            *((f.layout, f.keys) for f in self.foreign_formats),
        ]


def tied_embeddings(config: Mapping[str, Any]) -> bool:
    """Whether lm_head shares the input embeddings. transformers 5 ties when either config level says so
    (pre-v5 checkpoints kept the flag in `text_config` only), so both flags must be False to untie."""
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
