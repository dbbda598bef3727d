"""`vlmtune train`: LoRA fine-tuning of a VLM on transformers.Trainer + PEFT. Reads top to bottom:
config -> run dir / resume -> processor (image limits) -> data check -> model -> targets -> PEFT ->
Trainer with our callbacks -> final adapter dir.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoint, families
from ..adapters import save as adapter_save
from ..adapters.targets import TargetPlan, plan_targets
from ..config import ConfigError, TrainConfig, dump_yaml, load_train_config, to_dict
from ..errors import VlmtuneError
from ..io import dtypes
from . import rundir

log = logging.getLogger("vlmtune.train")


def resolve_config(
    config: TrainConfig | str | Path | dict[str, Any], overrides: Sequence[str] = ()
) -> TrainConfig:
    """A validated TrainConfig from a config object, a YAML path or a dict, plus `key=value` overrides."""
    from ..config import apply_overrides, from_dict

    if isinstance(config, TrainConfig):
        if overrides:
            return from_dict(TrainConfig, apply_overrides(to_dict(config), list(overrides))).validate()
        return config.validate()
    if isinstance(config, dict):
        return from_dict(TrainConfig, apply_overrides(config, list(overrides))).validate()
    return load_train_config(config, list(overrides))


def image_limits(cfg: TrainConfig, family: families.Family) -> dict[str, int]:
    """Processor kwargs for the image limits the config sets; an error where the family has none."""
    limits = dict(cfg.image_limits)
    unsupported = [k for k in limits if k not in family.image_limit_keys]
    if unsupported:
        raise ConfigError(
            f"{', '.join(unsupported)} would do nothing: {family.name}'s processor has no such limit "
            f"({'it has ' + ', '.join(family.image_limit_keys) if family.image_limit_keys else 'its image size is fixed'})."
        )
    return limits


def dry_run(config: TrainConfig | str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> TargetPlan:
    """Resolve the trainable set on the meta device (no weights loaded) and return it; raises for settings
    that would do nothing."""
    from ..modeling import meta_model

    cfg = resolve_config(config, overrides)
    folder = checkpoint.resolve(cfg.model, allow_patterns=["*.json", "*.jinja"])
    base_config = checkpoint.read_config(folder)
    family = families.detect(base_config)
    image_limits(cfg, family)
    return make_plan(meta_model(base_config), family, cfg)


def make_plan(model: Any, family: families.Family, cfg: TrainConfig) -> TargetPlan:
    return plan_targets(
        model,
        family,
        targets=cfg.lora.targets,
        projector=cfg.projector,
        vision=cfg.vision,
        language=cfg.language,
        r=cfg.lora.r,
        dora=cfg.lora.dora,
    )


@dataclass
class Precision:
    name: str  # bf16 | fp16 | fp32
    dtype: Any  # torch dtype of the frozen base weights
    on_cpu: bool


def pick_precision(requested: str) -> Precision:
    import torch

    cuda = torch.cuda.is_available()
    name = requested
    if requested == "auto":
        name = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if name == "fp16" and not cuda:
        raise ConfigError("precision: fp16 needs a CUDA GPU; use fp32 or bf16 on CPU.")
    dtype = dtypes.torch_dtype(name)
    return Precision(name, dtype, not cuda)


def run(
    config: TrainConfig | str | Path | dict[str, Any],
    overrides: Sequence[str] = (),
    callbacks: Sequence[Any] = (),
) -> Path:
    """Train and return the run dir (its `adapter/` is the result). `callbacks` are extra
    `transformers.TrainerCallback`s, called after vlmtune's own."""
    cfg = resolve_config(config, overrides)
    run_dir = Path(cfg.output_dir).absolute()
    resume_from = rundir.resolve_resume(run_dir, cfg.resume, to_dict(cfg))
    if resume_from is not None:
        log.info("resuming from %s", resume_from)

    folder = checkpoint.resolve(cfg.model)
    base_config = checkpoint.read_config(folder)
    checkpoint.check_weights(folder)
    family = families.detect(base_config)
    processor = load_processor(folder, image_limits(cfg, family))
    train_report, eval_report = check_data(cfg, processor, family)

    from transformers import set_seed

    set_seed(cfg.seed)
    precision = pick_precision(cfg.precision)
    model = load_model(folder, precision)
    packed = choose_packing(cfg, family, model)
    plan = make_plan(model, family, cfg)
    model = wrap_peft(model, plan, cfg)
    base = adapter_save.base_info(_model_id(cfg.model), folder, base_config, family.name)
    if cfg.init_from:
        manifest = adapter_save.check_base(cfg.init_from, base)
        n = adapter_save.load_into(model, cfg.init_from)
        log.info(
            "init_from %s: %d tensors (trained for %s steps)",
            cfg.init_from,
            n,
            manifest.training.get("steps"),
        )
    log.info("%s", plan.render())
    log.info("%s", train_report.summary())

    # The run dir is written only now, when training starts: a run refused above leaves nothing behind.
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.remove_partial(run_dir)
    (run_dir / rundir.CONFIG).write_text(dump_yaml(cfg))
    (run_dir / rundir.DATA).write_text(
        json.dumps(
            {"train": train_report.to_dict(), "eval": eval_report.to_dict() if eval_report else None},
            indent=2,
        )
        + "\n"
    )
    trainer = build_trainer(
        cfg, run_dir, model, processor, family, plan, base, train_report, eval_report, precision, packed
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    from .callbacks import RunStatus

    status = RunStatus(run_dir)  # train.lock + status.json: what tells `vlmtune ui` the run is alive
    trainer.add_callback(status)
    with status:  # held until the adapter is written
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        evaluated = any(
            "eval_loss" in row and row.get("step") == trainer.state.global_step
            for row in trainer.state.log_history
        )
        if trainer.eval_dataset is not None and not evaluated:
            trainer.evaluate()

        manifest = adapter_save.build_manifest(
            base,
            plan,
            training_summary(cfg, trainer.state, plan, train_report, eval_report, precision, packed),
        )
        adapter_save.save_adapter(model, processor, manifest, run_dir / rundir.ADAPTER, overwrite=True)
        _plot(run_dir)
    log.info("adapter written to %s", run_dir / rundir.ADAPTER)
    return run_dir


# -- steps ------------------------------------------------------------------------------------------------


def load_processor(folder: Path, limits: dict[str, int]) -> Any:
    """The base's processor with the run's image limits applied (they are saved with every adapter)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder, **limits)


def check_data(cfg: TrainConfig, processor: Any, family: families.Family) -> tuple[Any, Any]:
    """Check train (and eval) rows; split eval off train when asked; refuse invalid rows unless skipping."""
    import random

    from ..data import check_data as check

    train = check(cfg.data.train, processor, cfg.max_length, cfg.data.loss_on)
    train.enforce(cfg.data.skip_invalid)
    if train.invalid_rows:
        log.warning("skipping %d invalid rows of %s (data.skip_invalid)", train.invalid_rows, train.source)
    if train.truncated_rows:
        log.warning(
            "%d rows of %s are longer than max_length=%s and get truncated",
            train.truncated_rows,
            train.source,
            cfg.max_length,
        )
    evaluation = None
    if cfg.data.eval:
        evaluation = check(cfg.data.eval, processor, cfg.max_length, cfg.data.loss_on)
        evaluation.enforce(cfg.data.skip_invalid)
    elif cfg.data.eval_split:
        samples = list(train.samples)
        random.Random(cfg.seed).shuffle(samples)
        n_eval = max(1, round(len(samples) * cfg.data.eval_split))
        if n_eval >= len(samples):
            raise ConfigError(
                f"data.eval_split={cfg.data.eval_split} leaves no training rows of {len(samples)}."
            )
        held = {s.where for s in samples[:n_eval]}
        from ..data import DataReport

        evaluation = DataReport(
            source=f"{train.source} (eval_split)",
            rows=n_eval,
            samples=[s for s in train.samples if s.where in held],
        )
        train.samples = [s for s in train.samples if s.where not in held]
    if not family.mixed_image_batches:
        for report, size in ((train, cfg.batch_size), (evaluation, cfg.batch_size)):
            if report is None or (size == 1 and not cfg.max_tokens_per_batch):
                continue
            text_only = [s for s in report.samples if not s.images]
            if text_only and len(text_only) < len(report.samples):
                raise VlmtuneError(
                    f"{family.name}'s processor cannot batch rows without images with rows that have images, and "
                    f"{report.source} mixes them ({len(text_only)} text-only, e.g. {text_only[0].where}); set "
                    "batch_size: 1 or move the text-only rows to their own run."
                )
    return train, evaluation


def choose_packing(cfg: TrainConfig, family: families.Family, model: Any) -> bool:
    """Whether batches are packed (`packing: on` without an exact path raises before anything is written)."""
    from ..data.packing import choose

    choice = choose(cfg.packing, family, model.config)
    (log.warning if cfg.packing == "auto" and not choice.packed else log.info)("%s", choice.message)
    return choice.packed


def load_model(folder: Path, precision: Precision) -> Any:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=precision.dtype)


def wrap_peft(model: Any, plan: TargetPlan, cfg: TrainConfig) -> Any:
    """PEFT LoRA with the resolved regex and modules_to_save; trainable weights kept in fp32."""
    import torch
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=plan.target_regex,
        modules_to_save=list(plan.full_modules) or None,
        use_rslora=cfg.lora.rslora,
        use_dora=cfg.lora.dora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    trainable, _ = peft_model.get_nb_trainable_parameters()
    if trainable != plan.trainable_params:
        raise RuntimeError(
            f"PEFT trains {trainable} parameters but the target plan says {plan.trainable_params}; this is a "
            "vlmtune bug, please report it with your config."
        )
    return peft_model


def build_trainer(
    cfg: TrainConfig,
    run_dir: Path,
    model: Any,
    processor: Any,
    family: families.Family,
    plan: TargetPlan,
    base: Any,
    train_report: Any,
    eval_report: Any,
    precision: Precision,
    packed: bool = False,
) -> Any:
    from transformers import TrainingArguments

    from ..data.collate import SampleDataset
    from .callbacks import CompleteCheckpoints, EpochSeed, MetricsLog
    from .loss import supervised_token_loss
    from .trainer import VlmTrainer

    train_dataset = SampleDataset(train_report.samples, augment=cfg.augment)
    train_batches, rows_per_batch = planned_batches(cfg, train_dataset, train_report, packed)
    eval_dataset = SampleDataset(eval_report.samples) if eval_report else None
    has_eval = eval_dataset is not None
    report_to, extra_callbacks = _reporting(cfg, run_dir)
    checkpointing: dict[str, Any] = {}
    if cfg.gradient_checkpointing:
        checkpointing = {
            "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"use_reentrant": False},
        }
    args = TrainingArguments(
        output_dir=str(run_dir / rundir.CHECKPOINTS),
        per_device_train_batch_size=rows_per_batch,
        per_device_eval_batch_size=cfg.batch_size,
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
        report_to=report_to,
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
    )

    def manifest_for(state: Any) -> Any:
        summary = training_summary(cfg, state, plan, train_report, eval_report, precision, packed)
        return adapter_save.build_manifest(base, plan, summary)

    callbacks = [
        MetricsLog(run_dir / rundir.METRICS),
        CompleteCheckpoints(run_dir, processor, manifest_for, cfg.save_total_limit),
        EpochSeed(train_dataset),
        *extra_callbacks,
    ]
    collator = make_collator(cfg, processor, family, model, packed)
    projector_params = []
    if cfg.projector_lr is not None:
        projector_params = [
            p for n, p in model.named_parameters() if p.requires_grad and _role(n, family) == "projector"
        ]
    return VlmTrainer(
        model=model,
        args=args,
        train_dataset=train_batches,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=callbacks,
        compute_loss_func=supervised_token_loss,
        group_lrs=[(projector_params, cfg.projector_lr)] if projector_params else [],
    )


def make_collator(cfg: TrainConfig, processor: Any, family: families.Family, model: Any, packed: bool) -> Any:
    from ..data.collate import Collator
    from ..data.packing import PackedCollator, positions_for

    options: dict[str, Any] = {
        "loss_on": cfg.data.loss_on,
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        "supervised_logits_only": True,
    }
    if packed:
        return PackedCollator(processor, positions_for(family, model.config), **options)
    return Collator(processor, **options)


def planned_batches(cfg: TrainConfig, dataset: Any, report: Any, packed: bool) -> tuple[Any, int]:
    """The dataset the Trainer iterates and its batch size: rows (batch_size each), or with
    group_by_length / max_tokens_per_batch one item per planned batch (see vlmtune.data.batching)."""
    from ..data.batching import BatchDataset, padding_stats, plan_batches

    if not (cfg.group_by_length or cfg.max_tokens_per_batch):
        return dataset, cfg.batch_size
    cap = cfg.max_length or float("inf")
    lengths = [int(min(report.lengths[s.where], cap)) for s in dataset.samples]
    batches = plan_batches(
        lengths, cfg.batch_size, cfg.seed, cfg.group_by_length, cfg.max_tokens_per_batch, packed
    )
    stats = padding_stats(batches, lengths, packed)
    log.info(
        "planned %d batches of %d rows (%s); padding ratio of the plan %.3f",
        stats["batches"],
        len(lengths),
        "grouped by length" if cfg.group_by_length else f"<= {cfg.max_tokens_per_batch} tokens each",
        stats["padding_ratio"],
    )
    return BatchDataset(dataset, batches), 1


def data_workers(cfg: TrainConfig, precision: Precision) -> int:
    """On a GPU, batches are built in worker processes while the model computes (transformers' Trainer builds
    them in the training process by default): half the cores, at most 4. On CPU the model's threads already
    use every core, so batches are built in the training process. `data.workers` overrides both."""
    import os

    if cfg.data.workers is not None:
        workers = cfg.data.workers
    elif precision.on_cpu:
        workers = 0
    else:
        workers = min(4, (os.cpu_count() or 1) // 2)
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers would warn otherwise
    return workers


def training_summary(
    cfg: TrainConfig,
    state: Any,
    plan: TargetPlan,
    train_report: Any,
    eval_report: Any,
    precision: Precision,
    packed: bool = False,
) -> dict[str, Any]:
    """What the manifest records about how the adapter was trained."""
    losses = [row["loss"] for row in state.log_history if "loss" in row]
    evals = [row["eval_loss"] for row in state.log_history if "eval_loss" in row]
    return {
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "tokens": state.num_input_tokens_seen,
        "last_loss": losses[-1] if losses else None,
        "last_eval_loss": evals[-1] if evals else None,
        "trainable_params": plan.trainable_params,
        "lora": to_dict(cfg.lora),
        "roles": {"language": cfg.language, "vision": cfg.vision or "frozen", "projector": cfg.projector},
        "init_from": cfg.init_from,
        "lr": cfg.lr,
        "projector_lr": cfg.projector_lr,
        "batch_size": cfg.batch_size,
        "gradient_accumulation": cfg.gradient_accumulation,
        "batches": {
            "packing": cfg.packing,
            "packed": packed,
            "group_by_length": cfg.group_by_length,
            "max_tokens_per_batch": cfg.max_tokens_per_batch,
        },
        "scheduler": cfg.scheduler,
        "warmup": cfg.warmup,
        "precision": precision.name,
        "seed": cfg.seed,
        "max_length": cfg.max_length,
        "image_limits": dict(cfg.image_limits),
        "augment": cfg.augment,
        "data": {
            "train": train_report.to_dict(),
            "eval": eval_report.to_dict() if eval_report else None,
            "loss_on": cfg.data.loss_on,
        },
    }


# -- helpers ----------------------------------------------------------------------------------------------


def _model_id(model: str) -> str:
    """The base as the manifest names it: an absolute path for a local folder, else the hub id."""
    local = Path(model).expanduser()
    return str(local.absolute()) if local.is_dir() else model


def _role(param_name: str, family: families.Family) -> str | None:
    return family.role_of(param_name.removeprefix("base_model.model."))


def _reporting(cfg: TrainConfig, run_dir: Path) -> tuple[list[str], list[Any]]:
    if cfg.report_to == "none":
        return [], []
    if cfg.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "report_to: tensorboard needs the tensorboard package: pip install tensorboard."
            ) from None
        from transformers.integrations import TensorBoardCallback

        return [], [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard")))]
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("report_to: wandb needs the wandb package: pip install wandb.") from None
    return ["wandb"], []


def _plot(run_dir: Path) -> None:
    from .callbacks import plot_loss

    plot_loss(run_dir / rundir.METRICS, run_dir / rundir.PLOT)
