"""What vlmtune knows about one model family, as plain data.

A `Family` never imports torch or transformers: the merge and `inspect` read it while working on
raw safetensors headers, and they must stay light.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import VlmtuneError

# Roles every family maps its modules to. `embeddings` holds the input token embeddings; `lm_head` the
# output head (tied to the embeddings in some checkpoints).
ROLES = ("vision", "projector", "language", "embeddings", "lm_head")

# The Linear leaf names of a decoder layer (self-attention, cross-attention and MLP) in every family here.
DECODER_LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Renames = tuple[tuple[str, str], ...]

# Sizes of `vlmtune tiny` checkpoints, shared by every family: (hidden, intermediate, layers, heads,
# kv heads, vision width, vision depth, vision heads).
TINY_SIZES = {
    "tiny": (64, 128, 2, 4, 2, 32, 2, 2),
    "small": (512, 1408, 6, 8, 4, 256, 4, 4),
}

# Chat-template pieces: a message's text (string content or its text parts), and its content with each
# image part replaced by the family's image marker.
TEXT_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
)


def content_with_images(image_marker: str, video_marker: str | None = None) -> str:
    video = f"{{% elif part['type'] == 'video' or 'video' in part %}}{video_marker}" if video_marker else ""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}}{image_marker}"
        f"{video}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )


class UnsupportedModelError(VlmtuneError, ValueError):
    """The model is not one of the families vlmtune knows."""


@dataclass(frozen=True)
class Family:
    """Model-family knowledge: roles, LoRA targets, key layouts, and how to build a tiny checkpoint.

    Prefixes and patterns use **runtime** names, the ones `model.named_modules()` gives in transformers 5.
    """

    name: str
    model_types: tuple[str, ...]
    architecture: str
    # (role, runtime prefix), most specific first: the first prefix that matches decides the role.
    role_prefixes: tuple[tuple[str, str], ...]
    # role -> regex (re.fullmatch on a runtime module name) selecting the Linear layers LoRA may target.
    lora_target_patterns: Mapping[str, str]
    # On-disk name -> runtime name, as `from_pretrained` converts: (pattern, replacement), the first
    # matching pattern applies. Keys already in the runtime layout match none and stay as they are.
    disk_to_runtime: Renames
    # Layouts of adapters written by other tools (name -> renames from their module paths to runtime).
    foreign_layouts: Mapping[str, Renames] = field(default_factory=dict)
    # Per foreign layout: check(foreign_config, base_config, base_params, folder) raises when that
    # tool's settings (e.g. LLaVA's `mm_projector_type`) do not fit the base.
    foreign_checks: Mapping[str, Callable[..., None]] = field(default_factory=dict)
    # Why vLLM cannot serve this family at all ("" when it can).
    vllm_unsupported: str = ""
    # Whether lm_head can share the input embeddings (Mllama's embedding table has 8 extra rows: never).
    can_tie_embeddings: bool = True
    # Processor attributes that carry training-time image limits, if the family has them.
    image_limit_keys: tuple[str, ...] = ()
    # Builders for tiny checkpoints (`vlmtune tiny`): set by each family module.
    tiny_config: Callable[..., dict[str, Any]] | None = None
    tiny_processor: Callable[..., Any] | None = None
    # Adjusts a freshly initialised tiny model so it behaves like a trained checkpoint where init differs.
    tiny_post_init: Callable[[Any], None] | None = None
    special_tokens: tuple[str, ...] = ()
    # Tokenizer attribute -> special token, as the family's real tokenizer names them.
    token_roles: Mapping[str, str] = field(default_factory=dict)
    chat_template: str = ""
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
    rope_index_model: str = ""
    packing_unsupported: str = "vlmtune has no verified exact packed path for it"

    # -- roles ---------------------------------------------------------------------------------------
    def role_of(self, name: str) -> str | None:
        """The role of a runtime module or parameter name, or None when it lies outside every role."""
        for role, prefix in self.role_prefixes:
            if name == prefix or name.startswith(prefix + "."):
                return role
        return None

    def prefix_of(self, role: str) -> str:
        for r, prefix in self.role_prefixes:
            if r == role:
                return prefix
        raise KeyError(f"family {self.name} has no role {role!r}")

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

    # -- key layouts -----------------------------------------------------------------------------------
    def to_runtime(self, disk_name: str) -> str:
        """Map an on-disk parameter name (either layout) to its runtime name."""
        return apply_renames(self.disk_to_runtime, disk_name)

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


def apply_renames(renames: Renames, name: str) -> str:
    for pattern, replacement in renames:
        new, count = re.subn(pattern, replacement, name, count=1)
        if count:
            return new
    return name


def tied_embeddings(config: Mapping[str, Any]) -> bool:
    """Whether lm_head shares the input embeddings. transformers 5 ties when either config level says so
    (pre-v5 checkpoints kept the flag in `text_config` only), so both flags must be False to untie."""
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
