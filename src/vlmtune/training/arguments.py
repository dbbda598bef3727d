"""The run's `transformers.TrainingArguments`, derived from the config alone (a pure function, unit-tested),
and the two choices it depends on: precision and data-loader workers."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, TrainConfig
from ..io import dtypes
from . import rundir


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32
    dtype: Any  # torch dtype of the frozen base weights
    on_cpu: bool


def pick_precision(requested: str, cuda: bool | None = None) -> Precision:
    """`auto` is bf16 (fp16 where bf16 is not supported) on a GPU and fp32 on CPU; fp16 needs a GPU."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    name = requested
    if requested == "auto":
        # A GPU named but absent (`--estimate --gpu` plans for one): today's training GPUs support bf16.
        bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
        name = ("bf16" if bf16 else "fp16") if cuda else "fp32"
    if name == "fp16" and not cuda:
        raise ConfigError("precision: fp16 needs a CUDA GPU; use fp32 or bf16 on CPU.")
    dtype = dtypes.torch_dtype(name)
    return Precision(name, dtype, not cuda)


def data_workers(cfg: TrainConfig, precision: Precision) -> int:
    """On a GPU, batches are built in worker processes while the model computes (transformers' Trainer builds
    them in the training process by default): half the cores, at most 4. On CPU the model's threads already
    use every core, so batches are built in the training process. `data.workers` overrides both."""
    if cfg.data.workers is not None:
        return cfg.data.workers
    return 0 if precision.on_cpu else min(4, (os.cpu_count() or 1) // 2)


def require_reporter(report_to: str) -> None:
    """The package `report_to` needs must be installed (checked before anything is written)."""
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"report_to: {report_to} needs the {package} package: pip install {package}.")


def training_arguments(
    cfg: TrainConfig,
    run_dir: Path,
    precision: Precision,
    *,
    has_eval: bool,
    world_size: int = 1,
    rows_per_batch: int | None = None,
    packed: bool = False,
    **strategy: Any,
) -> Any:
    """`TrainingArguments` for `cfg`. `batch_size` is global: each of `world_size` processes takes its share.
    `rows_per_batch` overrides that (1 when each item is a planned batch); `packed` batches have no padding to leave out of the
    token count; `strategy` adds the distributed-strategy arguments (fsdp, deepspeed)."""
    from transformers import TrainingArguments

    require_reporter(cfg.report_to)
    per_device = max(1, cfg.batch_size // world_size)
    checkpointing: dict[str, Any] = {}
    if cfg.gradient_checkpointing is True and cfg.distributed != "fsdp2":  # fsdp2: its own (strategy)
        checkpointing = {
            "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"use_reentrant": False},
        }
    return TrainingArguments(
        output_dir=str(run_dir / rundir.CHECKPOINTS),
        per_device_train_batch_size=per_device if rows_per_batch is None else rows_per_batch,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        warmup_steps=int(cfg.warmup) if cfg.warmup >= 1 else cfg.warmup,
        lr_scheduler_type=cfg.scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        bf16=precision.name == "bf16",
        fp16=precision.name == "fp16",
        use_cpu=precision.on_cpu,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(cfg.eval_steps or cfg.save_steps) if has_eval else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # rotation happens over step-N folders (CompleteCheckpoints)
        report_to=["wandb"] if cfg.report_to == "wandb" else [],  # tensorboard: our callback (run dir)
        remove_unused_columns=False,
        # Packed batches have no padding (and no attention_mask to count it by).
        include_num_input_tokens_seen="all" if packed else "non_padding",
        label_names=["labels"],
        prediction_loss_only=True,  # eval needs the loss only; do not gather logits
        dataloader_pin_memory=not precision.on_cpu,
        # Workers are re-created each epoch (not persistent) so they see the dataset's new epoch number.
        dataloader_num_workers=data_workers(cfg, precision),
        disable_tqdm=False,
        **checkpointing,
        **strategy,
    )
