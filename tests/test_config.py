"""Typed configs: YAML + dotted overrides, unknown keys fail with a suggestion, bad values name the key."""

from __future__ import annotations

import re

import pytest
import yaml

from vlmtune.config import ConfigError, TrainConfig, apply_overrides, dump_yaml, from_dict, load_train_config

BASE = {"model": "m", "output_dir": "out", "data": {"train": "t.jsonl"}}


@pytest.fixture
def yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "lr": "2e-4", "lora": {"r": 16}}))
    return path


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("lora.rank=4", "lora.r"),
        ("lora.alhpa=4", "lora.alpha"),
        ("data.trian=x.jsonl", "data.train"),
        ("epoch=2", "epochs"),
        ("learning_rate=1e-4", "lr"),
        ("gradient_accumulation_steps=4", "gradient_accumulation"),
        ("lora_alpha=32", "lora.alpha"),
        ("projecter=full", "projector"),
    ],
)
def test_unknown_keys_fail_with_a_suggestion(yaml_file, override, suggestion):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}'; did you mean '{suggestion}'\?"):
        load_train_config(yaml_file, [override])


def test_unknown_key_in_the_yaml_file_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "lora": {"targets": "language", "dorra": True}}))
    with pytest.raises(ConfigError, match=re.escape("'lora.dorra'; did you mean 'lora.dora'")):
        load_train_config(path)


def test_nothing_close_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"valid keys: .*batch_size"):
        from_dict(TrainConfig, {**BASE, "zzzzzz": 1})


def test_overrides_are_typed_and_nested(yaml_file):
    cfg = load_train_config(
        yaml_file,
        [
            "lora.targets=[a, b]",
            "max_steps=10",
            "vision=lora",
            "resume=false",
            "data.eval_split=0.1",
            "warmup=0.05",
        ],
    )
    assert cfg.lr == 2e-4  # PyYAML reads `2e-4` as a string; the float field takes it
    assert cfg.lora.r == 16 and cfg.lora.targets == ["a", "b"] and cfg.max_steps == 10
    assert cfg.vision == "lora" and cfg.resume is False and cfg.data.eval_split == 0.1
    again = load_train_config(yaml_file, ["resume=checkpoints/step-5", "lora.targets=language+vision"])
    assert again.resume == "checkpoints/step-5" and again.lora.targets == "language+vision"


def test_resolved_config_round_trips(yaml_file, tmp_path):
    cfg = load_train_config(yaml_file, ["projector=full", "projector_lr=1e-5"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_train_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.r=abc"], "lora.r must be a whole number"),
        (["lr=fast"], "lr must be a number"),
        (["projector=half"], "projector must be one of 'frozen', 'lora', 'full'"),
        (["precision=fp8"], "precision must be one of"),
        (["data.skip_invalid=maybe"], "must be true or false"),
        (["data=3"], "config section data must be a mapping"),
        (["lr"], "not of the form key=value"),
        (["lora.r.x=1"], "'r' is a value, not a section"),
        (["data.eval=e.jsonl", "data.eval_split=0.1"], "either data.eval"),
        (["data.eval_split=1.5"], "between 0 and 1"),
        (["projector_lr=1e-5"], "projector_lr is set but the projector is frozen"),
        (["eval_steps=10"], "no eval data"),
        (["warmup=2.5"], "whole number of steps"),
        (["lora.dropout=1.0"], "lora.dropout"),
        (["batch_size=0"], "batch_size must be positive"),
        (["image_limits.min_pixels=5000", "image_limits.max_pixels=100"], "larger than max_pixels"),
        (["image_limits.max_pixels=0"], "image_limits.max_pixels must be positive"),
        (["image_limits=3"], "image_limits must be a mapping"),
        # The pre-registry top-level spelling says the new one in one line.
        (["max_pixels=100"], "image limits are per family: write image_limits.max_pixels"),
        (["image_max_pixels=100"], "did you mean 'image_limits.max_pixels'?"),
        (["resume=true"], "resume must be auto, false or the path"),
        (["model="], "model must be a string (got None)"),
    ],
)
def test_bad_values_name_the_key(yaml_file, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_train_config(yaml_file, overrides)
    assert message in str(info.value)


def test_required_keys():
    with pytest.raises(ConfigError, match=r"missing required config key\(s\): model, output_dir, data.train"):
        from_dict(TrainConfig, {}).validate()


def test_apply_overrides_leaves_the_input_alone():
    data = {"lora": {"r": 8}}
    out = apply_overrides(data, ["lora.r=4", "seed=3"])
    assert data == {"lora": {"r": 8}} and out == {"lora": {"r": 4}, "seed": 3}


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_train_config(path)
