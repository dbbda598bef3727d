"""`gradient_checkpointing: language | vision | true`: only the chosen tower recomputes its blocks in the
backward (counted with forward hooks on the blocks the family names), the adapter equals the one trained
without checkpointing (<= 1e-5), and `--check` passes with each setting."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from vlmtune import families
from vlmtune.demo import write_split
from vlmtune.training import run
from vlmtune.training.check import check_gradients

FAMILY = families.get("qwen2_vl")
STEPS = 2
SETTINGS = [False, "language", "vision", True]
# Forward calls per block per step, (language, vision): 2 where the backward recomputes the block.
EXPECTED = {False: (1, 1), "language": (2, 1), "vision": (1, 2), True: (2, 2)}


def config(base, data, out, setting) -> dict:
    return {
        "model": str(base),
        "output_dir": str(out),
        "data": {"train": str(data)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "vision": "lora",  # vision blocks with trained weights: a frozen tower has no backward to recompute
        "lr": 1e-3,
        "max_steps": STEPS,
        "batch_size": 2,
        "save_steps": 100,
        "precision": "fp32",
        "seed": 1,
        "gradient_checkpointing": setting,
    }


class CountBlockCalls(TrainerCallback):
    """Counts the forward calls of the family's language and vision blocks during training: on each block's
    first child, as transformers' checkpointing recomputes `forward` itself (the block's own hooks do not
    fire again; its children's do)."""

    def __init__(self) -> None:
        self.calls = {"language": 0, "vision": 0}
        self.blocks = {"language": 0, "vision": 0}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for path in FAMILY.block_lists:
            role = next(r for r in ("language", "vision") if path.startswith(FAMILY.prefix_of(r)))
            for block in model.get_submodule("base_model.model." + path).children():
                self.blocks[role] += 1
                next(block.children()).register_forward_pre_hook(lambda *_, role=role: self.count(role))

    def count(self, role: str) -> None:
        self.calls[role] += 1

    def per_block_and_step(self) -> tuple[float, float]:
        return tuple(self.calls[r] / (self.blocks[r] * STEPS) for r in ("language", "vision"))


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpointing")
    return tiny_model("qwen2_vl"), write_split(root / "data", "train", 8, 0), root


@pytest.fixture(scope="module")
def trained(setup):
    base, data, root = setup
    made = {}

    def get(setting):
        if setting not in made:
            counter = CountBlockCalls()
            out = run(config(base, data, root / str(setting), setting), callbacks=[counter])
            made[setting] = (
                counter.per_block_and_step(),
                load_file(out / "adapter" / "adapter_model.safetensors"),
            )
        return made[setting]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_only_the_chosen_tower_recomputes_and_the_adapter_is_unchanged(trained, setting):
    calls, adapter = trained(setting)
    assert calls == EXPECTED[setting]
    _, reference = trained(False)
    assert sorted(adapter) == sorted(reference)
    assert any("visual" in k for k in adapter) and any("language_model" in k for k in adapter)
    worst = max((adapter[k] - reference[k]).abs().max().item() for k in adapter)
    assert worst <= 1e-5, worst
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 1e-4  # it trained


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_check_passes_with_each_setting(setup, setting):
    base, data, root = setup
    report = check_gradients({**config(base, data, root / "check", setting), "projector": "full"})
    assert set(report.modules) >= {"language", "vision", "projector"} and torch.isfinite(
        torch.tensor(report.loss)
    )
