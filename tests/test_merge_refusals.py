"""Every refusal of the merge: it fails with a message that says what and how to fix, before writing
anything — no OUT, no temp folder left beside it, the base and adapter untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_merge_support import CONV, make_adapter, tree_checksums
from vlmtune.checkpoint import CheckpointError
from vlmtune.errors import VlmtuneError
from vlmtune.fsutil import OutputExistsError
from vlmtune.merging import MergeError, merge


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """A private copy of a tiny Qwen2-VL base and a plain adapter for it."""
    root = tmp_path_factory.mktemp("refusals")
    base = root / "models" / "base"
    shutil.copytree(tiny_model("qwen2_vl"), base)
    adapter = make_adapter(base, root / "adapters" / "plain", modules_to_save=["model.visual.merger"])
    return root, base, adapter


def refuse(exc: type[BaseException], match: str, base: Path, adapters, out: Path, **kwargs) -> BaseException:
    """Run a merge that must fail; check nothing was written and the inputs are unchanged."""
    adapters = adapters if isinstance(adapters, list) else [adapters]
    before = {p: tree_checksums(p) for p in [base, *adapters]}
    existed = out.exists()
    siblings = set(out.parent.iterdir()) if out.parent.exists() else set()
    with pytest.raises(exc, match=match) as info:
        merge(base, adapters, out, **kwargs)
    assert isinstance(info.value, VlmtuneError)  # the CLI prints these as one line, exit 2
    if not existed:
        assert not out.exists()
    if out.parent.exists():
        assert set(out.parent.iterdir()) == siblings, "a temp folder or partial output was left behind"
    assert {p: tree_checksums(p) for p in [base, *adapters]} == before
    return info.value


def test_quantized_base(setup, tmp_path):
    _, base, adapter = setup
    qbase = tmp_path / "q"
    shutil.copytree(base, qbase)
    config = json.loads((qbase / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qbase / "config.json").write_text(json.dumps(config))
    err = refuse(MergeError, "quantized", qbase, adapter, tmp_path / "out")
    assert "unquantized base" in str(err) and "bf16/fp16" in str(err)
    for method in ("gptq", "awq"):
        config["quantization_config"] = {"quant_method": method, "bits": 4}
        (qbase / "config.json").write_text(json.dumps(config))
        refuse(MergeError, method, qbase, adapter, tmp_path / "out")


def test_output_equal_to_or_inside_base(setup):
    _, base, adapter = setup
    refuse(MergeError, "inside the base", base, adapter, base)
    refuse(MergeError, "inside the base", base, adapter, base / "merged")
    refuse(MergeError, "inside the base", base, adapter, base / "merged", overwrite=True)


def test_output_containing_base_or_adapter(setup):
    _root, base, adapter = setup
    # with --overwrite these would delete the inputs
    refuse(MergeError, "contains the base", base, adapter, base.parent, overwrite=True)
    refuse(MergeError, "adapter folder", base, adapter, adapter, overwrite=True)
    refuse(MergeError, "adapter folder", base, adapter, adapter.parent, overwrite=True)


def test_non_empty_output_needs_overwrite(setup, tmp_path):
    _, base, adapter = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    refuse(OutputExistsError, "--overwrite", base, adapter, out)
    assert (out / "keep.txt").read_text() == "user data"
    merge(base, adapter, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    # an empty folder is fine without --overwrite
    (tmp_path / "empty").mkdir()
    merge(base, adapter, tmp_path / "empty")


def test_adapter_of_another_family(setup, tiny_model, tmp_path):
    """By its declared base (the same refusal as predict's), or, with no base declared, by its keys."""
    _, _, adapter = setup
    llava = tiny_model("llava")
    refuse(MergeError, r"a qwen2_vl model, but the base is a llava model", llava, adapter, tmp_path / "out")
    anonymous = tmp_path / "anonymous"
    shutil.copytree(adapter, anonymous)
    config = json.loads((anonymous / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path")
    (anonymous / "adapter_config.json").write_text(json.dumps(config))
    err = refuse(VlmtuneError, "cannot be placed", llava, anonymous, tmp_path / "out")
    assert "base_model.model.model.language_model" in str(err) or "merger" in str(err)


def test_unknown_key_in_adapter(setup, tmp_path):
    _, base, adapter = setup
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    state = load_file(bad / "adapter_model.safetensors")
    key = next(iter(state))
    state[key.replace("q_proj", "qq_proj").replace("down_proj", "dn_proj")] = state.pop(key)
    save_file(state, bad / "adapter_model.safetensors")
    err = refuse(VlmtuneError, "cannot be placed", base, bad, tmp_path / "out")
    assert "qq_proj" in str(err) or "dn_proj" in str(err)


def test_lora_bias_on_layer_without_bias(setup, tmp_path):
    _, base, _ = setup
    adapter = make_adapter(base, tmp_path / "a", targets=r".*\.o_proj", lora_bias=True)  # o_proj has no bias
    refuse(MergeError, "no bias", base, adapter, tmp_path / "out")


def test_conv_lora_that_cannot_be_merged(setup, tmp_path):
    _, base, _ = setup
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(base, tmp_path / "a", targets=[CONV["qwen2_vl"]])
    state = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("lora_B.weight"))
    out_ch, r = state[key].shape[:2]
    import torch

    state[key] = torch.randn(out_ch, r, 1, 3, 3)  # a non-1x1 lora_B kernel: no closed-form merge
    save_file(state, adapter / "adapter_model.safetensors")
    refuse(MergeError, "cannot be merged", base, adapter, tmp_path / "out")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_base_rewriting_init(setup, tmp_path, init):
    _, base, adapter = setup
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    (bad / "adapter_config.json").write_text(json.dumps(config))
    # (the shared adapter reader refuses them, for the merge and un-merged inference alike)
    refuse(VlmtuneError, "init_lora_weights", base, bad, tmp_path / "out")


def test_ensure_weight_tying_on_tied_base(tiny_model, tmp_path):
    base = tiny_model("qwen2_vl", overrides={"tie_word_embeddings": True})
    adapter = make_adapter(base, tmp_path / "a", targets=["model.language_model.embed_tokens"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["ensure_weight_tying"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    refuse(MergeError, "ensure_weight_tying", base, adapter, tmp_path / "out")


def test_bad_options(setup, tmp_path):
    _, base, adapter = setup
    refuse(MergeError, "--dtype", base, adapter, tmp_path / "out", dtype="int8")
    refuse(VlmtuneError, "not a size", base, adapter, tmp_path / "out", max_shard_size="lots")
    refuse(MergeError, "at least one", base, [], tmp_path / "out")


def test_pickled_only_base(setup, tmp_path):
    _, base, adapter = setup
    pickled = tmp_path / "pickled"
    shutil.copytree(base, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    refuse(CheckpointError, "pickled", pickled, adapter, tmp_path / "out")


def test_missing_base_and_adapter(setup, tmp_path):
    _, base, adapter = setup
    refuse(VlmtuneError, "neither a local folder", tmp_path / "nope", adapter, tmp_path / "out")
    refuse(VlmtuneError, "neither a local folder", base, tmp_path / "nope", tmp_path / "out")


def test_fp16_overflow_and_non_finite_adapter(setup, tmp_path):
    """Caught while writing (the values only exist then): the temp folder is removed, no OUT."""
    _, base, adapter = setup
    from safetensors.torch import load_file, save_file

    huge = tmp_path / "huge"
    shutil.copytree(adapter, huge)
    state = load_file(huge / "adapter_model.safetensors")
    for k in state:
        if k.endswith("lora_B.weight"):
            state[k] = state[k] * 1e6
    save_file(state, huge / "adapter_model.safetensors")
    refuse(MergeError, "overflows float16", base, huge, tmp_path / "out", dtype="fp16")

    nan = tmp_path / "nan"
    shutil.copytree(adapter, nan)
    state = load_file(nan / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, nan / "adapter_model.safetensors")
    refuse(MergeError, "NaN/Inf", base, nan, tmp_path / "out")
