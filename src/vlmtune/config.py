"""The training config: `TrainConfig` (every key `vlmtune train` reads, with its cross-field checks) and
`load_train_config` (YAML plus dotted `key=value` overrides, torchtune style: `lora.r=16 lr=2e-4`).

Every key is checked against the dataclass fields (the machinery is `vlmtune.typedconfig`): an unknown key
is an error that names the closest known key (or the key's name here, when it is another tool's), a value
of the wrong type is an error that names the key and the expected type. Nothing here imports torch, so
`vlmtune train --dry-run` and config errors come back fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import families, typedconfig
from .typedconfig import (
    ConfigError,
    apply_overrides,
    close_match,
    dump_yaml,
    known_keys,
    read_yaml,
    to_dict,
)

__all__ = [
    "ALIASES",
    "ConfigError",
    "DataConfig",
    "LoraSettings",
    "TrainConfig",
    "apply_overrides",
    "dump_yaml",
    "from_dict",
    "known_keys",
    "load_train_config",
    "read_yaml",
    "suggest",
    "to_dict",
]


# -- the training config ------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the rows come from and how they become supervised sequences."""

    train: str = ""
    # A separate eval file, or a fraction of `train` held out (deterministic for a seed); not both.
    eval: str | None = None
    eval_split: float | None = None
    # Invalid rows stop training unless this is true; then they are skipped and counted.
    skip_invalid: bool = False
    # `assistant`: loss on assistant turns only (the anchors' default); `all`: on every text token.
    loss_on: Literal["assistant", "all"] = "assistant"
    # DataLoader worker processes that load images and build batches while the model computes;
    # null: on a GPU half the CPU cores (at most 4), on CPU 0 (batches built in the training process).
    workers: int | None = None


@dataclass
class LoraSettings:
    """LoRA hyper-parameters and which layers get LoRA (see `vlmtune.adapters.targets`)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # A preset (`language`, `language+vision`, `language+vision+projector`), one regex (re.fullmatch on runtime
    # module names), or a list of such regexes / full module names.
    targets: str | list[str] = "language"
    rslora: bool = False
    dora: bool = False


@dataclass
class TrainConfig:
    """Everything `vlmtune train` needs; `docs/training.md` documents each field."""

    model: str = ""
    output_dir: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    # Role switches. `vision: null` follows `lora.targets`; `projector: full` trains it fully (PEFT
    # modules_to_save); `language: frozen` + `projector: full` is LLaVA's stage-1 projector pretraining.
    projector: Literal["frozen", "lora", "full"] = "frozen"
    vision: Literal["frozen", "lora"] | None = None
    language: Literal["lora", "frozen"] = "lora"
    # Start from an earlier run's adapter dir (progressive training); it must be made for the same base.
    init_from: str | None = None
    lr: float = 1e-4
    projector_lr: float | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 1
    gradient_accumulation: int = 1
    # Padding-free packed batches (see vlmtune.data.packing): `auto` packs where the family and attention
    # kernel have an exact packed path and pads otherwise (saying so once); `on` refuses to pad.
    packing: Literal["auto", "on", "off"] = "auto"
    # Padded runs: batch rows of similar length together, so less of each batch is padding.
    group_by_length: bool = False
    # Batches filled to a token budget instead of `batch_size` rows: the sum of row lengths when packed,
    # rows x longest row when padded.
    max_tokens_per_batch: int | None = None
    # Steps (>= 1) or a ratio of all steps (< 1), as transformers' `warmup_steps`.
    warmup: float = 0.0
    # transformers' schedulers that need no extra arguments.
    scheduler: Literal[
        "cosine",
        "linear",
        "constant",
        "constant_with_warmup",
        "cosine_with_restarts",
        "polynomial",
        "inverse_sqrt",
    ] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Recompute activations in backward to save memory: true (the whole model), language or vision (that
    # tower only; not under fsdp2, whose activation checkpointing covers every block).
    gradient_checkpointing: bool | Literal["language", "vision"] = False
    # Several processes (`vlmtune train CONFIG --nproc N`, torchrun, accelerate launch): ddp (a replica per
    # process), fsdp2 (parameters, gradients and optimizer state sharded block by block), zero2 / zero3
    # (DeepSpeed, GPUs only). `batch_size` is the global batch: each process takes batch_size / N rows.
    distributed: Literal["ddp", "fsdp2", "zero2", "zero3"] = "ddp"
    # Your own DeepSpeed JSON for zero2 / zero3 instead of the shipped preset.
    deepspeed: str | None = None
    # QLoRA: the frozen base loaded quantized by bitsandbytes (4bit: NF4 + double quant; 8bit: int8), the
    # LoRA weights in full precision.
    quantization: Literal["4bit", "8bit"] | None = None
    # Longest sequence in tokens (image tokens included); longer rows are truncated, counted and reported.
    max_length: int | None = None
    # Image resolution limits: processor attributes the model's family declares (`image_limit_keys`,
    # e.g. min_pixels/max_pixels); a key the family lacks is an error once the model is known.
    image_limits: dict[str, int] = field(default_factory=dict)
    # Light, size-preserving image augmentation (colour jitter, small shifts); off by default.
    augment: bool = False
    eval_steps: int | None = None
    save_steps: int = 500
    save_total_limit: int | None = None
    logging_steps: int = 10
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    # `auto`: continue from the last complete checkpoint in output_dir (start fresh when there is none);
    # a path: that checkpoint; `false`: refuse to touch a non-empty output_dir.
    resume: str | bool = "auto"

    def validate(self) -> TrainConfig:
        """Cross-field checks: settings that contradict each other or would do nothing are errors."""
        need = {"model": self.model, "output_dir": self.output_dir, "data.train": self.data.train}
        missing = [k for k, v in need.items() if not v]
        if missing:
            raise ConfigError(f"missing required config key(s): {', '.join(missing)}.")
        if self.data.eval and self.data.eval_split is not None:
            raise ConfigError("set either data.eval (a file) or data.eval_split (a fraction), not both.")
        if self.data.eval_split is not None and not 0 < self.data.eval_split < 1:
            raise ConfigError(f"data.eval_split must lie between 0 and 1 (got {self.data.eval_split}).")
        positive = {
            "lora.r": self.lora.r,
            "lora.alpha": self.lora.alpha,
            "batch_size": self.batch_size,
            "gradient_accumulation": self.gradient_accumulation,
            "save_steps": self.save_steps,
            "logging_steps": self.logging_steps,
            "lr": self.lr,
        }
        optional_positive = {
            "max_steps": self.max_steps,
            "eval_steps": self.eval_steps,
            "save_total_limit": self.save_total_limit,
            "max_length": self.max_length,
            "max_tokens_per_batch": self.max_tokens_per_batch,
            "projector_lr": self.projector_lr,
            **{f"image_limits.{k}": v for k, v in self.image_limits.items()},
        }
        for key, value in {
            **positive,
            **{k: v for k, v in optional_positive.items() if v is not None},
        }.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive (got {value}).")
        if self.data.workers is not None and self.data.workers < 0:
            raise ConfigError(f"data.workers must be 0 or more (got {self.data.workers}).")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError(f"epochs must be positive (got {self.epochs}); or set max_steps.")
        if not 0 <= self.lora.dropout < 1:
            raise ConfigError(f"lora.dropout must lie in [0, 1) (got {self.lora.dropout}).")
        if self.warmup < 0 or (self.warmup >= 1 and self.warmup != int(self.warmup)):
            raise ConfigError(
                f"warmup must be a ratio in [0, 1) or a whole number of steps (got {self.warmup})."
            )
        if self.eval_steps is not None and not (self.data.eval or self.data.eval_split):
            raise ConfigError(
                "eval_steps is set but there is no eval data; set data.eval or data.eval_split."
            )
        for key, low in self.image_limits.items():
            high = self.image_limits.get("max_" + key[4:]) if key.startswith("min_") else None
            if high is not None and low > high:
                raise ConfigError(f"image_limits: {key} ({low}) is larger than max_{key[4:]} ({high}).")
        if self.projector_lr is not None and self.projector != "full" and self.projector != "lora":
            raise ConfigError(
                "projector_lr is set but the projector is frozen, so it would do nothing; "
                "set projector: full or projector: lora, or drop projector_lr."
            )
        if self.group_by_length and self.packing != "off":
            raise ConfigError(
                f"group_by_length orders rows to cut padding, but packing: {self.packing} may pack batches, "
                "which have none; set packing: off to use group_by_length, or drop it."
            )
        if self.max_tokens_per_batch is not None and self.batch_size != 1:
            raise ConfigError(
                f"set either batch_size ({self.batch_size}) or max_tokens_per_batch "
                f"({self.max_tokens_per_batch}), not both: a token budget decides the rows per batch."
            )
        if isinstance(self.resume, bool) and self.resume:
            raise ConfigError("resume must be auto, false or the path of a checkpoint (got true).")
        return self


# -- loading ------------------------------------------------------------------------------------------------


def load_train_config(
    source: TrainConfig | str | Path | dict[str, Any] | None = None, overrides: Sequence[str] = ()
) -> TrainConfig:
    """A validated TrainConfig from a YAML path, a dict or a TrainConfig (or the defaults), with `key=value`
    overrides applied and every key type-checked."""
    if isinstance(source, TrainConfig):
        data = to_dict(source)
    elif isinstance(source, dict):
        data = source
    elif source is None:
        data = {}
    else:
        data = read_yaml(source)
    return from_dict(TrainConfig, apply_overrides(data, overrides)).validate()


# Names other tools (transformers, LLaMA-Factory, swift) use for our keys: suggested when difflib finds nothing.
ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "lr_scheduler_type": "scheduler",
    "warmup_steps": "warmup",
    "warmup_ratio": "warmup",
    "lora_rank": "lora.r",
    "rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target": "lora.targets",
    "target_modules": "lora.targets",
    "model_name_or_path": "model",
    "dataset": "data.train",
    "cutoff_len": "max_length",
    "neat_packing": "packing",
    "padding_free": "packing",
    "max_tokens": "max_tokens_per_batch",
    "image_max_pixels": "image_limits.max_pixels",
    "image_min_pixels": "image_limits.min_pixels",
    "bf16": "precision",
    "fp16": "precision",
    "resume_from_checkpoint": "resume",
    "freeze_vision_tower": "vision",
    "freeze_multi_modal_projector": "projector",
    "freeze_language_model": "language",
}


def suggest(key: str, candidates: list[str]) -> str:
    """The hint for an unknown training key: image limits, other tools' names (`ALIASES`), else the
    closest candidate or the list of valid keys."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf in families.image_limit_keys():  # a family's processor limit, spelled as a top-level key
        return f"; image limits are per family: write image_limits.{leaf}"
    alias = ALIASES.get(leaf)
    if alias in candidates or (alias and alias.split(".")[0] in candidates):
        return f"; did you mean {alias!r}?"
    return close_match(key, candidates)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build config dataclass `cls` from a mapping (see `typedconfig.from_dict`), unknown keys named with
    the training config's hints (`suggest`)."""
    return typedconfig.from_dict(cls, data, prefix, suggest=suggest)
