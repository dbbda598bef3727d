"""`vlmtune train`: LoRA fine-tuning of a VLM on transformers.Trainer + PEFT. Reads top to bottom:
config -> run dir / resume -> processor (image limits) -> data check and split -> model -> batches (packed or
padded) and training arguments -> targets -> PEFT -> Trainer with our callbacks -> final adapter dir.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checkpoint, families
from ..adapters import save as adapter_save
from ..adapters.manifest import Manifest
from ..adapters.targets import TargetPlan, plan_targets
from ..config import ConfigError, TrainConfig, dump_yaml, load_train_config, to_dict
from ..data import DataReport
from ..data.collate import SampleDataset
from ..errors import VlmtuneError
from . import distributed, integrity, rundir
from .arguments import Precision, pick_precision, training_arguments
from .batches import ImageInEveryBatch, choose_packing, make_collator, planned_batches
from .callbacks import RunStatus
from .summary import training_summary

log = logging.getLogger("vlmtune.train")
Config = TrainConfig | str | Path | dict[str, Any]


@dataclass
class Setup:
    """What a run has resolved before the model is built: everything the Trainer and the manifest need."""

    cfg: TrainConfig
    run_dir: Path
    family: families.Family
    train: DataReport
    evaluation: DataReport | None
    precision: Precision
    packed: bool


def dry_run(config: Config, overrides: Sequence[str] = ()) -> TargetPlan:
    """Resolve the trainable set on the meta device (no weights loaded) and return it; raises for settings
    that would do nothing."""
    from ..modeling import meta_model

    cfg = load_train_config(config, overrides)
    folder = checkpoint.resolve(cfg.model, allow_patterns=["*.json", "*.jinja"])
    base_config = checkpoint.read_config(folder)
    family = families.detect(base_config)
    image_limits(cfg, family)
    return make_plan(meta_model(base_config), family, cfg)


def run(config: Config, overrides: Sequence[str] = (), callbacks: Sequence[Any] = ()) -> Path:
    """Train and return the run dir (its `adapter/` is the result). `callbacks` are extra
    `transformers.TrainerCallback`s, called after vlmtune's own."""
    cfg = load_train_config(config, overrides)
    run_dir = Path(cfg.output_dir).absolute()
    resume_from = rundir.resolve_resume(run_dir, cfg.resume, to_dict(cfg))
    if resume_from is not None:
        log.info("resuming from %s", resume_from)

    folder = checkpoint.resolve(cfg.model)
    base_config = checkpoint.read_config(folder)
    checkpoint.check_weights(folder)
    family = families.detect(base_config)
    procs = distributed.world()
    precision = pick_precision(cfg.precision)
    distributed.preflight(cfg, procs, not precision.on_cpu, family)
    processor = load_processor(folder, image_limits(cfg, family))
    train, evaluation = prepare_data(cfg, processor, family, procs)

    from transformers import set_seed

    set_seed(cfg.seed)
    model = load_model(folder, precision, cfg, family)
    setup = Setup(
        cfg,
        run_dir,
        family,
        train,
        evaluation,
        precision,
        choose_packing(cfg, family, model, train, distributed.per_device_batch(cfg, procs)),
    )
    rows = SampleDataset(train.samples, augment=cfg.augment)
    batches, rows_per_batch = planned_batches(cfg, rows, train, setup.packed)
    args = training_arguments(
        cfg,
        run_dir,
        precision,
        has_eval=evaluation is not None,
        world_size=procs.size,
        rows_per_batch=rows_per_batch,
        packed=setup.packed,
        **distributed.strategy_arguments(cfg, model, family),
    )
    if args.dataloader_num_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers would warn otherwise
    plan = make_plan(model, family, cfg)
    model = wrap_peft(model, plan, cfg)
    if cfg.gradient_checkpointing in ("language", "vision"):
        checkpoint_part(model, family, cfg.gradient_checkpointing)
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
    log.info("%s", train.summary())

    # The run dir is written only now, when training starts: a run refused above leaves nothing behind.
    # One process writes (rank 0); the others wait for it.
    if procs.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.remove_partial(run_dir)
        (run_dir / rundir.CONFIG).write_text(dump_yaml(cfg))
        reports = {"train": train.to_dict(), "eval": evaluation.to_dict() if evaluation else None}
        (run_dir / rundir.DATA).write_text(json.dumps(reports, indent=2) + "\n")
    integrity.barrier()

    def manifest_for(state: Any) -> Manifest:
        summary = training_summary(
            cfg,
            state,
            plan,
            train,
            evaluation,
            precision.name,
            packed=setup.packed,
            world_size=args.world_size,
        )
        return adapter_save.build_manifest(base, plan, summary)

    trainer = make_trainer(setup, args, model, processor, rows, batches, manifest_for)
    for callback in callbacks:
        trainer.add_callback(callback)
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
        integrity.save_checked(
            trainer, processor, manifest_for(trainer.state), run_dir / rundir.ADAPTER, procs.main
        )
        if procs.main:
            _plot(run_dir)
    if procs.main:
        log.info("adapter written to %s", run_dir / rundir.ADAPTER)
    return run_dir


# -- steps ------------------------------------------------------------------------------------------------


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


def load_processor(folder: Path, limits: dict[str, int]) -> Any:
    """The base's processor with the run's image limits applied (they are saved with every adapter)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder, **limits)


def prepare_data(
    cfg: TrainConfig, processor: Any, family: families.Family, procs: distributed.World | None = None
) -> tuple[DataReport, DataReport | None]:
    """Check train (and eval) rows, refusing invalid rows unless skipping; split eval off train when asked;
    refuse sources the processor cannot batch."""
    from ..data import check_data
    from ..data.split import require_batchable, split_eval

    procs = procs or distributed.World()

    train = check_data(cfg.data.train, processor, cfg.max_length, cfg.data.loss_on)
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
        evaluation = check_data(cfg.data.eval, processor, cfg.max_length, cfg.data.loss_on)
        evaluation.enforce(cfg.data.skip_invalid)
    elif cfg.data.eval_split:
        train, evaluation = split_eval(train, cfg.data.eval_split, cfg.seed)
    one_row = cfg.batch_size == 1 and not cfg.max_tokens_per_batch
    for report in (train, evaluation):
        if report is not None:
            # Several processes add an image row to batches without images (training.batches), so the
            # processor must take text-only rows next to an image row.
            require_batchable(report, family, one_row_batches=one_row and procs.size == 1)
            if (
                procs.size > 1
                and not family.mixed_image_batches
                and any(not s.images for s in report.samples)
            ):
                raise VlmtuneError(
                    f"{report.source} has text-only rows, and with several processes every batch needs an image "
                    f"(so every process runs the vision tower), which {family.name}'s processor cannot add next to "
                    "text-only rows; train in one process or move the text-only rows to their own run."
                )
    return train, evaluation


def load_model(folder: Path, precision: Precision, cfg: TrainConfig, family: families.Family) -> Any:
    """The base in the run's precision; with `quantization`, its language model quantized by bitsandbytes
    (QLoRA) and prepared by PEFT for k-bit training (norms in fp32, input gradients on)."""
    from transformers import AutoModelForImageTextToText

    if not cfg.quantization:
        return without_cache(AutoModelForImageTextToText.from_pretrained(folder, dtype=precision.dtype))
    from peft import prepare_model_for_kbit_training

    from ..infer import quant

    compute = precision.dtype
    # Under FSDP2 the 4-bit weights are stored as the compute dtype so they can be sharded (uint8 storage
    # crashes or trains to NaN: accelerate #3983); elsewhere bitsandbytes' default uint8.
    storage = compute if cfg.distributed == "fsdp2" else None
    config = quant.bnb_config(cfg.quantization, family, compute, quant_storage=storage)
    model = AutoModelForImageTextToText.from_pretrained(
        folder,
        dtype=compute,
        quantization_config=config,
        device_map={"": quant.train_device(precision.on_cpu)},
    )
    return without_cache(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))


def without_cache(model: Any) -> Any:
    """Training reads no KV cache, so none is built: it costs memory, and under FSDP2's activation
    checkpointing each recompute appended its keys to it (keys twice the mask's length, a crash)."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.use_cache = False
    return model


def checkpoint_part(model: Any, family: families.Family, role: str) -> None:
    """Gradient checkpointing in one tower only (`gradient_checkpointing: language | vision`)."""
    prefix = "base_model.model." + family.prefix_of(role)
    module = model.get_submodule(prefix)
    if not hasattr(module, "gradient_checkpointing_enable"):
        raise ConfigError(
            f"gradient_checkpointing: {role}: {family.name}'s {role} model cannot checkpoint alone."
        )
    module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def wrap_peft(model: Any, plan: TargetPlan, cfg: TrainConfig) -> Any:
    """PEFT LoRA with the resolved regex and modules_to_save, and the plan's bare parameters trainable;
    trainable weights kept in fp32."""
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
    for name in plan.bare_parameters:  # trained beside PEFT, saved by adapters.save.add_bare
        peft_model.get_base_model().get_parameter(name).requires_grad_(True)
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


def make_trainer(
    setup: Setup, args: Any, model: Any, processor: Any, rows: Any, batches: Any, manifest_for: Any
) -> Any:
    """The Trainer over our datasets (`batches`: what it iterates, `rows` or planned batches of them),
    collator, loss and callbacks."""
    from .callbacks import CompleteCheckpoints, EpochSeed, MetricsLog
    from .loss import supervised_token_loss
    from .trainer import DropImageOnlyGrads, VlmTrainer

    cfg, run_dir = setup.cfg, setup.run_dir
    eval_dataset = SampleDataset(setup.evaluation.samples) if setup.evaluation else None
    callbacks = [
        MetricsLog(run_dir / rundir.METRICS),
        CompleteCheckpoints(run_dir, processor, manifest_for, cfg.save_total_limit),
        EpochSeed(rows),
        *_reporting(cfg, run_dir),
    ]
    collator = make_collator(cfg, processor, setup.family, model, setup.packed)
    several = distributed.world().size > 1
    if several:
        collator = ImageInEveryBatch(collator, setup.packed)
    projector = set()
    if cfg.projector_lr is not None:
        projector = {
            n
            for n, p in model.named_parameters()
            if p.requires_grad and _role(n, setup.family) == "projector"
        }
    trainer = VlmTrainer(
        model=model,
        args=args,
        train_dataset=batches,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=callbacks,
        compute_loss_func=supervised_token_loss,
        group_lrs=[(projector, cfg.projector_lr)] if projector else [],
        strategy=cfg.distributed if several else None,
    )
    if several:
        image_only = {
            n
            for n, p in model.named_parameters()
            if p.requires_grad and _role(n, setup.family) in ("vision", "projector")
        }
        trainer.add_callback(DropImageOnlyGrads(trainer, image_only))
    return trainer


# -- helpers ----------------------------------------------------------------------------------------------


def _model_id(model: str) -> str:
    """The base as the manifest names it: an absolute path for a local folder, else the hub id."""
    local = Path(model).expanduser()
    return str(local.absolute()) if local.is_dir() else model


def _role(param_name: str, family: families.Family) -> str | None:
    return family.role_of(param_name.removeprefix("base_model.model."))


def _reporting(cfg: TrainConfig, run_dir: Path) -> list[Any]:
    """Callbacks for `report_to` (wandb is the Trainer's own `report_to`, set in the arguments)."""
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard")))]
    return []


def _plot(run_dir: Path) -> None:
    from .callbacks import plot_loss

    plot_loss(run_dir / rundir.METRICS, run_dir / rundir.PLOT)
