"""`vlmtune.train.run` on tiny folders of every family: the loss drops, the adapter dir is complete and loads
with plain `PeftModel.from_pretrained` (no missing / unexpected keys) to the trained model's logits, and a
fully trained projector (bare parameters such as LLaVA-NeXT's image_newline included) is stored, differs
from the base, and reloads."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

from vlmtune import checkpoint, families
from vlmtune.adapters.manifest import read_manifest
from vlmtune.adapters.save import missing_files
from vlmtune.data import check_data
from vlmtune.data.collate import Collator, SampleDataset
from vlmtune.demo import write_split
from vlmtune.training import run

STEPS = 6


class KeepModel(TrainerCallback):
    """Holds the in-memory model at the end of training (the reference the saved adapter must reproduce)."""

    model = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def batch_for(folder: Path, data: Path, rows: int = 4) -> dict:
    processor = AutoProcessor.from_pretrained(folder)
    samples = SampleDataset(check_data(data).samples[:rows])
    batch = Collator(processor)([samples[i] for i in range(len(samples))])
    return batch


def loss_of(model, batch) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One short run per family (language LoRA + projector full), shared by the tests below."""
    made = {}

    def get(family: str):
        if family not in made:
            root = tmp_path_factory.mktemp(f"run-{family}")
            base = tiny_model(family)
            data = write_split(root / "data", "train", 16, seed=0)
            keep = KeepModel()
            run_dir = run(
                {
                    "model": str(base),
                    "output_dir": str(root / "run"),
                    "data": {"train": str(data)},
                    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                    "projector": "full",
                    "lr": 1e-2,
                    "max_steps": STEPS,
                    "batch_size": 4,
                    "save_steps": 3,
                    "logging_steps": 1,
                    "precision": "fp32",
                    "image_limits": (
                        {"min_pixels": 28 * 28 * 4, "max_pixels": 56 * 56}
                        if families.get(family).image_limit_keys
                        else {}
                    ),
                },
                callbacks=[keep],
            )
            made[family] = (base, data, run_dir, keep.model.cpu())  # trained on a GPU where there is one
        return made[family]

    return get


# Projector modules beyond the first: Qwen3-VL's DeepStack mergers (a ModuleList PEFT wraps child by child).
MORE_PROJECTOR = {"qwen3_vl": ["model.visual.deepstack_merger_list.0"]}


def test_loss_goes_down(trained, family_name):
    base, data, run_dir, model = trained(family_name)
    batch = batch_for(base, data)
    model.eval()
    with model.disable_adapter():
        before = loss_of(model, batch)
    after = loss_of(model, batch)
    assert after < before - 0.5, (before, after)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert all({"step", "lr", "grad_norm", "tokens_per_second"} <= set(r) for r in rows if "loss" in r)
    assert (run_dir / "loss.png").stat().st_size > 1000


def test_adapter_loads_plainly_and_reproduces_logits(trained, family_name):
    base, data, run_dir, model = trained(family_name)
    adapter = run_dir / "adapter"
    batch = batch_for(base, data)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits

    fresh = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(fresh, adapter).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        stored = set(f.keys())
    # nothing missing, nothing unexpected: PEFT's own state dict, plus the bare parameters trained in full
    # under their PEFT parameter name (PEFT's loader put them into the base parameter)
    bare = {f"base_model.model.{name}" for name in families.get(family_name).bare_parameters}
    assert stored == set(get_peft_model_state_dict(loaded)) | bare
    with torch.no_grad():
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # ...and the adapter really changes the model (the comparison above is not base vs base).
    with torch.no_grad(), loaded.disable_adapter():
        assert (loaded(**batch).logits - expected).abs().max() > 1e-2


def test_full_projector_is_stored_trained_and_reloads(trained, family_name):
    base, _, run_dir, _ = trained(family_name)
    family = families.get(family_name)
    projector = family.prefix_of("projector")
    base_tensors = {family.to_runtime(name): info for name, info in checkpoint.tensor_index(base).items()}
    fresh = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    base_state = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = PeftModel.from_pretrained(fresh, run_dir / "adapter")
    loaded_state = dict(loaded.named_parameters())
    prefix = "base_model.model."
    with safe_open(run_dir / "adapter" / "adapter_model.safetensors", "pt") as f:
        full = [k for k in f.keys() if k.startswith(prefix + projector + ".")]  # noqa: SIM118 (safe_open has no __iter__)
        assert full, "the projector is missing from the adapter"
        for key in full:
            name = key.removeprefix(prefix)
            assert name in base_tensors  # a real projector weight of the base, under its runtime name
            tensor = f.get_tensor(key)
            assert not torch.equal(tensor, base_state[name]), f"{name} was not trained"
            leaf = name.removeprefix(projector + ".") if name != projector + ".weight" else "weight"
            reloaded = loaded_state[f"{prefix}{projector}.modules_to_save.default.{leaf}"]
            torch.testing.assert_close(reloaded.detach(), tensor, rtol=0, atol=0)
        for name in family.bare_parameters:  # no module of their own: stored and reloaded as themselves
            tensor = f.get_tensor(prefix + name)
            assert not torch.equal(tensor, base_state[name]), f"{name} was not trained"
            torch.testing.assert_close(loaded_state[prefix + name].detach(), tensor, rtol=0, atol=0)


def test_run_dir_and_checkpoints_are_complete(trained, family_name):
    base, _, run_dir, _ = trained(family_name)
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "data.json"):
        assert (run_dir / name).is_file(), name
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step-3", "step-6"]
    for folder in [run_dir / "adapter", *(run_dir / "checkpoints").iterdir()]:
        assert missing_files(folder) == [], folder
        manifest = read_manifest(folder)
        assert manifest.base.fingerprint == checkpoint.fingerprint(base)
        assert manifest.base.name_or_path == str(base.absolute())
        assert manifest.base.family == family_name
        assert manifest.base.model_type == checkpoint.read_config(base)["model_type"]
        projector = [families.get(family_name).prefix_of("projector"), *MORE_PROJECTOR.get(family_name, [])]
        assert sorted(manifest.full_modules) == sorted(projector)
        assert manifest.full_parameters == list(families.get(family_name).bare_parameters)
        assert manifest.targets_by_role == {"language": len(manifest.target_modules)}
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["target_modules"] == manifest.target_regex
        # the processor saved with the adapter loads and carries the training-time image limits
        processor = AutoProcessor.from_pretrained(folder)
        if families.get(family_name).image_limit_keys:
            assert processor.image_processor.size["shortest_edge"] == 28 * 28 * 4
            assert processor.image_processor.size["longest_edge"] == 56 * 56
    for folder in (run_dir / "checkpoints").iterdir():
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
            assert (folder / name).is_file(), (folder, name)
    assert read_manifest(run_dir / "adapter").training["steps"] == STEPS
    assert read_manifest(run_dir / "checkpoints" / "step-3").training["steps"] == 3


def test_loss_from_supervised_logits_only_equals_the_models_own_loss(tiny_model, family_name, tmp_path):
    """Training projects onto the vocabulary only where a label follows; the loss must not change."""
    from vlmtune.training.loss import supervised_token_loss

    base = tiny_model(family_name)
    processor = AutoProcessor.from_pretrained(base)
    dataset = SampleDataset(check_data(write_split(tmp_path, "train", 6, seed=2)).samples)
    items = [dataset[i] for i in range(len(dataset))]
    full = Collator(processor)(items)
    kept = Collator(processor, supervised_logits_only=True)(items)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(**full).loss  # transformers' ForCausalLMLoss over all positions
        labels = kept.pop("labels")
        outputs = model(**kept)
        supervised = int((labels[:, 1:] != -100).sum())
        assert outputs.logits.shape == (supervised, model.config.get_text_config().vocab_size)
        ours = supervised_token_loss(outputs, labels)
        halved = supervised_token_loss(outputs, labels, num_items_in_batch=torch.tensor(2 * supervised))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(halved, reference / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {
            "vision": "lora",
            "lora": {"dora": True, "rslora": True, "r": 4},
            "gradient_checkpointing": True,
            "augment": True,
            "max_length": 56,
            "data": {"loss_on": "all", "eval_split": 0.25},
            "save_steps": 1,
            "save_total_limit": 1,
        },
        {
            "precision": "bf16",
            "projector": "lora",
            "warmup": 0.5,
            "scheduler": "linear",
            "data": {"workers": 1},
        },
    ],
    ids=["many-options", "bf16-projector-lora-worker"],
)
def test_option_combinations_train_and_load(tiny_model, tmp_path, options):
    base = tiny_model("qwen2_vl")
    data = write_split(tmp_path / "data", "train", 12, seed=4)
    config = {
        "model": str(base),
        "output_dir": str(tmp_path / "run"),
        "lr": 1e-3,
        "max_steps": 3,
        "batch_size": 4,
        **options,
        "data": {"train": str(data), **options.get("data", {})},
    }
    run_dir = run(config)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-3"]
    summary = json.loads((run_dir / "data.json").read_text())
    if "max_length" in options:
        assert summary["train"]["truncated"] > 0  # 56 cuts the 57-token rows' last token
    loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), run_dir / "adapter")
    manifest = read_manifest(run_dir / "adapter")
    assert set(manifest.targets_by_role) == {"language", "vision" if "vision" in options else "projector"}
    assert loaded.peft_config["default"].use_dora == options.get("lora", {}).get("dora", False)


def test_mllama_refuses_to_batch_text_only_rows_with_image_rows(tiny_model, tmp_path):
    from vlmtune.errors import VlmtuneError

    data = write_split(tmp_path, "train", 4, seed=0)
    text_only = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "red"}]}
    with open(data, "a") as f:
        f.write(json.dumps(text_only) + "\n")
    config = {
        "model": str(tiny_model("mllama")),
        "output_dir": str(tmp_path / "r"),
        "data": {"train": str(data)},
    }
    with pytest.raises(VlmtuneError, match="cannot batch rows without images") as info:
        run({**config, "batch_size": 2, "max_steps": 1})
    assert f"{data} line 5" in str(info.value)
    run({**config, "batch_size": 1, "max_steps": 1})  # one row per batch is fine
