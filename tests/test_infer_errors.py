"""Strict loading: an adapter that does not fit fails before any generation, with a message that names the
keys, the cause and the fix; the engine stays as it was."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_infer_fixtures import IMAGE_PROMPT, LM_REGEX, VISION_REGEX, image, make_adapter
from vlmtune.adapters.manifest import BaseInfo, Manifest
from vlmtune.errors import VlmtuneError
from vlmtune.infer import Request, load


@pytest.fixture(scope="module")
def qwen(tiny_model, tmp_path_factory):
    base = tiny_model("qwen2_vl")
    root = tmp_path_factory.mktemp("errors")
    good = make_adapter(base, root / "good", seed=21, target_modules=f"{LM_REGEX}|{VISION_REGEX['qwen2_vl']}")
    return base, good


def edit(src, dst, change_tensors=None, change_config=None):
    shutil.copytree(src, dst)
    if change_tensors is not None:
        tensors = load_file(dst / "adapter_model.safetensors")
        save_file(change_tensors(tensors), dst / "adapter_model.safetensors")
    if change_config is not None:
        config = json.loads((dst / "adapter_config.json").read_text())
        change_config(config)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_renamed_key_names_the_key_cause_and_fix(qwen, tmp_path):
    base, good = qwen
    renamed = edit(
        good,
        tmp_path / "renamed",
        lambda t: {
            k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.query"): v for k, v in t.items()
        },
    )
    with pytest.raises(VlmtuneError) as err:
        load(base, {"x": renamed}, device="cpu")
    message = str(err.value)
    assert "2 adapter tensor(s) cannot be placed" in message
    assert "base_model.model.model.language_model.layers.1.self_attn.query.lora_A.weight" in message
    assert "no 'query' inside it: a renamed key" in message and "Fix:" in message


def test_rank_in_config_and_weights_disagree(qwen, tmp_path):
    base, good = qwen
    wrong = edit(good, tmp_path / "rank", change_config=lambda c: c.update(r=8))
    with pytest.raises(
        VlmtuneError,
        match=r"has rank 4 in its tensors \(lora_A \(4, \d+\), lora_B \(\d+, 4\)\) but adapter_config.json says r=8",
    ):
        load(base, {"x": wrong}, device="cpu")


def test_shape_mismatch_names_key_shapes_and_the_expected_base(qwen, tmp_path):
    base, good = qwen
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    bigger = edit(good, tmp_path / "bigger", lambda t: {**t, key: torch.randn(4, 96)})
    Manifest(
        BaseInfo("org/bigger-model", "sha256:0", "Qwen2VLForConditionalGeneration", "qwen2_vl", "qwen2_vl")
    ).write(bigger)
    with pytest.raises(VlmtuneError) as err:
        load(base, {"x": bigger}, device="cpu")
    message = str(err.value)
    assert "made for org/bigger-model" in message
    assert "model.language_model.layers.0.self_attn.q_proj" in message
    assert "(lora_A (4, 96)" in message and "weight (64, 64)" in message


def test_adapter_of_another_family_fails(qwen, tiny_model, tmp_path):
    """A Qwen2-VL adapter on a LLaVA base: by its declared base, by its manifest, or by its keys."""
    base, good = qwen
    llava = tiny_model("llava")
    with pytest.raises(VlmtuneError, match=r"a qwen2_vl model, but the base is a llava model"):
        load(llava, {"x": good}, device="cpu")
    with_manifest = edit(good, tmp_path / "manifest")
    Manifest(
        BaseInfo(str(base), "sha256:0", "Qwen2VLForConditionalGeneration", "qwen2_vl", "qwen2_vl")
    ).write(with_manifest)
    with pytest.raises(VlmtuneError, match=r"trained on a qwen2_vl model .* but the base is a llava model"):
        load(llava, {"x": with_manifest}, device="cpu")
    anonymous = edit(good, tmp_path / "anonymous", change_config=lambda c: c.pop("base_model_name_or_path"))
    with pytest.raises(VlmtuneError) as err:
        load(llava, {"x": anonymous}, device="cpu")
    assert "model.visual.blocks" in str(err.value)
    assert "lies under a module the llava base does not have" in str(err.value)
    assert "made for another model family" in str(err.value)


def test_failed_add_leaves_the_engine_as_it_was(qwen, tmp_path):
    base, good = qwen
    engine = load(base, {"good": good}, device="cpu")
    before = engine.logits(Request(IMAGE_PROMPT, [image(0)], "good"))[0]
    wrong = edit(good, tmp_path / "rank", change_config=lambda c: c.update(r=8))
    with pytest.raises(VlmtuneError):
        engine.add_adapter("wrong", wrong)
    assert list(engine.adapters) == ["good"]
    assert torch.equal(engine.logits(Request(IMAGE_PROMPT, [image(0)], "good"))[0], before)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"init_lora_weights": "pissa"}, "subtracts the initial factors from the base weights"),
        ({"init_lora_weights": "loftq"}, "LoftQ and LoRA-GA replace them"),
        ({"bias": "all"}, "bias='all'"),
        ({"peft_type": "IA3"}, "peft_type IA3 is not supported"),
        ({"use_qalora": True}, "QA-LoRA"),
    ],
)
def test_settings_that_cannot_be_applied_are_refused(qwen, tmp_path, change, match):
    base, good = qwen
    folder = edit(good, tmp_path / "setting", change_config=lambda c: c.update(change))
    with pytest.raises(VlmtuneError, match=match):
        load(base, {"x": folder}, device="cpu")


def test_a_changed_base_weight_saved_with_lm_head_lora_is_refused(tiny_model, tmp_path):
    """PEFT saves lm_head's base weight beside LoRA on lm_head; a changed copy cannot be served un-merged."""
    base = tiny_model("llava")
    adapter = make_adapter(base, tmp_path / "head", seed=22, target_modules=["q_proj", "lm_head"])
    key = "base_model.model.lm_head.base_layer.weight"
    assert key in load_file(adapter / "adapter_model.safetensors")
    load(base, {"head": adapter}, device="cpu")  # the unchanged copy is fine
    changed = edit(adapter, tmp_path / "changed", lambda t: {**t, key: t[key] + 0.5})
    with pytest.raises(VlmtuneError, match=r"replaces the base weight lm_head.weight.*vlmtune merge"):
        load(base, {"head": changed}, device="cpu")


def test_adapter_names_are_checked(qwen):
    base, good = qwen
    engine = load(base, device="cpu")
    for bad in ("__base__", "none", "a.b", ""):
        with pytest.raises(VlmtuneError, match="not usable"):
            engine.add_adapter(bad, good)
    engine.add_adapter("a", good)
    with pytest.raises(VlmtuneError, match="already loaded"):
        engine.add_adapter("a", good)
    engine.remove_adapter("a")
    assert engine.adapters == {}


def test_quantization_says_what_the_platform_lacks(qwen, monkeypatch):
    import importlib.util

    base, _ = qwen
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(VlmtuneError, match=r"quantization 4bit needs the bitsandbytes package"):
        load(base, quantization="4bit")
    monkeypatch.undo()
    with pytest.raises(VlmtuneError, match=r"unknown quantization '3bit'"):
        load(base, quantization="3bit", device="cuda")


def test_a_key_peft_does_not_take_fails_the_load(qwen, monkeypatch):
    """The load is checked after PEFT has the state dict: a LoRA tensor PEFT did not place (here: one left
    out of the state dict) fails loudly instead of PEFT's warning about missing keys."""
    from vlmtune.adapters import peft_bridge

    base, good = qwen
    engine = load(base, device="cpu")
    state_dict = peft_bridge.peft_state_dict

    def without_one(adapter, **kwargs):
        state = state_dict(adapter, **kwargs)
        state.pop(next(k for k in state if k.endswith("lora_B.weight")))
        return state

    monkeypatch.setattr(peft_bridge, "peft_state_dict", without_one)
    with pytest.raises(VlmtuneError, match=r"PEFT did not take the adapter .*missing keys: \['base_model"):
        engine.add_adapter("x", good)
    assert engine.adapters == {}
    monkeypatch.undo()
    base_only = engine.logits(Request(IMAGE_PROMPT, [image(0)], "none"))[0]
    engine.add_adapter("x", good)
    assert torch.equal(engine.logits(Request(IMAGE_PROMPT, [image(0)], "none"))[0], base_only)
    assert not torch.equal(engine.logits(Request(IMAGE_PROMPT, [image(0)], "x"))[0], base_only)


def test_a_wrong_adapter_fails_before_the_base_weights_load(qwen, tmp_path, monkeypatch):
    """Adapters are placed on the base's safetensors headers first: no time is spent loading the model."""
    from transformers import AutoModelForImageTextToText

    base, good = qwen
    wrong = edit(good, tmp_path / "rank", change_config=lambda c: c.update(r=8))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter was checked")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_load)
    with pytest.raises(VlmtuneError, match="says r=8"):
        load(base, {"x": wrong}, device="cpu")
