"""Progressive training: stage 1 trains only the projector (language frozen, no LoRA layer at all), stage 2
starts from its adapter with `init_from`; a stage-1 adapter of another base is refused; `projector_lr` puts
the projector in its own optimizer group."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TrainerCallback

from vlmtune.adapters.save import AdapterError
from vlmtune.adapters.targets import NO_LORA_TARGETS
from vlmtune.demo import write_split
from vlmtune.training import run

PROJECTOR = "model.visual.merger"


class AtStart(TrainerCallback):
    """Copies the trainable weights and the optimizer's groups when training starts."""

    def __init__(self) -> None:
        self.weights: dict = {}
        self.groups: list = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.groups = [
            (g.get("initial_lr", g["lr"]), [self.names[id(p)] for p in g["params"]])
            for g in optimizer.param_groups
        ]


def config(base, data, out, **extra) -> dict:
    return {
        "model": str(base),
        "output_dir": str(out),
        "data": {"train": str(data)},
        "lr": 5e-3,
        "max_steps": 3,
        "batch_size": 4,
        "save_steps": 3,
        "logging_steps": 1,
        "precision": "fp32",
        **extra,
    }


@pytest.fixture(scope="module")
def stage1(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    data = write_split(root / "data", "train", 12, seed=0)
    out = run(config(tiny_model("qwen2_vl"), data, root / "run", language="frozen", projector="full"))
    return data, out / "adapter"


def test_projector_only_stage_is_a_plain_peft_adapter(tiny_model, stage1):
    _, adapter = stage1
    stored = load_file(adapter / "adapter_model.safetensors")
    assert stored and all(k.startswith(f"base_model.model.{PROJECTOR}.") for k in stored)
    base = tiny_model("qwen2_vl")
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), adapter)
    assert loaded.peft_config["default"].target_modules == NO_LORA_TARGETS
    reloaded = dict(loaded.named_parameters())
    for key, tensor in stored.items():
        leaf = key.removeprefix(f"base_model.model.{PROJECTOR}.")
        torch.testing.assert_close(
            reloaded[f"base_model.model.{PROJECTOR}.modules_to_save.default.{leaf}"], tensor
        )


def test_stage2_starts_from_stage1_and_projector_lr_gets_its_group(tiny_model, stage1, tmp_path):
    data, adapter = stage1
    start = AtStart()
    out = run(
        config(
            tiny_model("qwen2_vl"),
            data,
            tmp_path / "s2",
            projector="full",
            init_from=str(adapter),
            projector_lr=1e-4,
        ),
        callbacks=[start],
    )
    stage1_tensors = load_file(adapter / "adapter_model.safetensors")
    for key, tensor in stage1_tensors.items():
        leaf = key.removeprefix(f"base_model.model.{PROJECTOR}.")
        torch.testing.assert_close(
            start.weights[f"base_model.model.{PROJECTOR}.modules_to_save.default.{leaf}"], tensor
        )
    stage2 = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in stage2) and stage1_tensors.keys() <= stage2.keys()
    assert any(not torch.equal(stage2[k], stage1_tensors[k]) for k in stage1_tensors)  # kept training

    by_lr: dict[float, list[str]] = {}
    for lr, names in start.groups:
        by_lr.setdefault(lr, []).extend(names)
    assert set(by_lr) == {5e-3, 1e-4}
    assert by_lr[1e-4] and all(f".{PROJECTOR}." in n for n in by_lr[1e-4])
    assert not any(f".{PROJECTOR}." in n for n in by_lr[5e-3])
    assert sorted(by_lr[1e-4] + by_lr[5e-3]) == sorted(start.weights)


def test_init_from_another_base_or_without_room_is_refused(tiny_model, stage1, tmp_path):
    data, adapter = stage1
    other_base = tiny_model("qwen2_vl", seed=1)
    with pytest.raises(AdapterError, match="was made for base"):
        run(config(other_base, data, tmp_path / "a", projector="full", init_from=str(adapter)))
    with pytest.raises(AdapterError, match="has no place for"):
        run(config(tiny_model("qwen2_vl"), data, tmp_path / "b", init_from=str(adapter)))
