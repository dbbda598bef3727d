"""The pure pieces of the training recipe: TrainingArguments from a config, the manifest's training summary,
and the data rules (eval split, batchable rows) — no model, no Trainer."""

from __future__ import annotations

import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers.trainer_utils import SchedulerType

from vlmtune import families
from vlmtune.config import ConfigError, TrainConfig, load_train_config, to_dict
from vlmtune.conversation import Conversation, Message, Part, from_placeholders
from vlmtune.data import DataReport, Sample
from vlmtune.data.split import require_batchable, split_eval
from vlmtune.errors import VlmtuneError
from vlmtune.training.arguments import Precision, training_arguments
from vlmtune.training.summary import training_summary

FP32 = Precision("fp32", None, on_cpu=True)
BASE = {"model": "m", "output_dir": "out", "data": {"train": "t.jsonl"}}


def cfg(*overrides: str) -> TrainConfig:
    return load_train_config(dict(BASE), list(overrides))


def test_arguments_follow_the_config(tmp_path: Path):
    args = training_arguments(
        cfg("batch_size=4", "gradient_accumulation=2", "lr=3e-4", "warmup=5", "max_steps=7", "seed=3"),
        tmp_path,
        FP32,
        has_eval=False,
    )
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 2)
    assert (args.learning_rate, args.warmup_steps, args.max_steps, args.seed) == (3e-4, 5, 7, 3)
    assert args.output_dir == str(tmp_path / "checkpoints") and args.use_cpu and not (args.bf16 or args.fp16)
    assert args.eval_strategy == "no" and args.report_to == [] and not args.activation_checkpointing
    assert args.dataloader_num_workers == 0 and args.remove_unused_columns is False


def test_arguments_ratio_warmup_epochs_eval_and_checkpointing(tmp_path: Path):
    c = cfg("warmup=0.1", "epochs=2", "data.eval_split=0.2", "eval_steps=3", "gradient_checkpointing=true")
    args = training_arguments(c, tmp_path, Precision("bf16", None, on_cpu=True), has_eval=True)
    assert args.warmup_steps == 0.1 and args.max_steps == -1 and args.num_train_epochs == 2
    assert args.eval_strategy == "steps" and args.eval_steps == 3 and args.bf16
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    no_steps = training_arguments(cfg("data.eval_split=0.2", "save_steps=9"), tmp_path, FP32, has_eval=True)
    assert no_steps.eval_steps == 9  # eval follows the saves unless eval_steps says otherwise


def test_every_scheduler_the_config_accepts_is_one_transformers_has(tmp_path: Path):
    allowed = typing.get_args(typing.get_type_hints(TrainConfig)["scheduler"])
    assert "cosine" in allowed
    for name in allowed:
        assert training_arguments(
            cfg(f"scheduler={name}"), tmp_path, FP32, has_eval=False
        ).lr_scheduler_type == (SchedulerType(name))
    with pytest.raises(ConfigError, match="scheduler must be one of"):
        cfg("scheduler=bogus")


def test_a_missing_reporting_package_is_a_config_error(tmp_path: Path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="report_to: wandb needs the wandb package"):
        training_arguments(cfg("report_to=wandb"), tmp_path, FP32, has_eval=False)


def test_summary_records_every_config_field():
    c = cfg("lora.dropout=0.1", "projector=full", "projector_lr=1e-5", "augment=true")
    state = SimpleNamespace(
        global_step=4,
        epoch=0.5,
        num_input_tokens_seen=100,
        log_history=[{"loss": 2.0}, {"eval_loss": 1.5}, {"loss": 1.0}],
    )
    report = DataReport(source="t.jsonl", rows=3)
    plan = SimpleNamespace(trainable_params=42)
    summary = training_summary(c, state, plan, report, None, "fp32", packed=True, world_size=2)
    assert summary["config"] == to_dict(c) and summary["config"]["lora"]["dropout"] == 0.1
    assert (summary["steps"], summary["last_loss"], summary["last_eval_loss"]) == (4, 1.0, 1.5)
    assert (summary["world_size"], summary["precision"], summary["trainable_params"]) == (2, "fp32", 42)
    assert summary["packed"] is True
    assert summary["data"] == {"train": report.to_dict(), "eval": None}


def sample(i: int, images: bool = True) -> Sample:
    user = Message("user", from_placeholders("<image>q" if images else "q"))
    answer = Message("assistant", (Part("text", "a"),))
    return Sample(
        Conversation((user, answer), (Path(f"{i}.png"),) if images else ()), where=f"t.jsonl line {i}"
    )


def test_eval_split_is_seeded_disjoint_and_keeps_file_order():
    report = DataReport(source="t.jsonl", rows=10, samples=[sample(i) for i in range(10)])
    train, held = split_eval(report, 0.3, seed=1)
    _, held_again = split_eval(report, 0.3, seed=1)
    _, other = split_eval(report, 0.3, seed=2)
    assert [s.where for s in held.samples] == [s.where for s in held_again.samples]
    assert {s.where for s in held.samples} != {s.where for s in other.samples}
    assert len(held.samples) == 3 and len(train.samples) == 7 and train.rows == 10
    assert sorted(train.samples + held.samples, key=lambda s: int(s.where.split()[-1])) == report.samples
    assert train.samples == [s for s in report.samples if s in train.samples]  # file order kept
    assert len(report.samples) == 10  # the input report is left as it was
    with pytest.raises(VlmtuneError, match="leaves no training rows"):
        split_eval(DataReport(source="t", rows=1, samples=[sample(0)]), 0.5, seed=0)


def test_rows_a_processor_cannot_batch_are_refused_unless_batches_hold_one_row():
    mixed = DataReport(source="t.jsonl", rows=2, samples=[sample(0), sample(1, images=False)])
    strict = next(f for f in families.FAMILIES.values() if not f.mixed_image_batches)
    lenient = next(f for f in families.FAMILIES.values() if f.mixed_image_batches)
    with pytest.raises(VlmtuneError, match=r"cannot batch rows without images.*t.jsonl line 1"):
        require_batchable(mixed, strict, one_row_batches=False)
    require_batchable(mixed, strict, one_row_batches=True)
    require_batchable(mixed, lenient, one_row_batches=False)
