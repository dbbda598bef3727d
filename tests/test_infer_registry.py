"""The adapter registry: removing an adapter really detaches it from PEFT, a name can be reused for another
folder, and each loaded adapter carries a content hash of its files (what serve keys its caches by)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_infer_fixtures import IMAGE_PROMPT, PROJECTOR, TEXT_PROMPT, image, make_adapter, peft_logits
from vlmtune.infer import BASE, InferenceError, Request, load


@pytest.fixture(scope="module")
def llava(tiny_model, tmp_path_factory):
    base = tiny_model("llava")
    root = tmp_path_factory.mktemp("registry")
    return {
        "base": base,
        "a": make_adapter(base, root / "a", seed=41, modules_to_save=[PROJECTOR["llava"]]),
        "b": make_adapter(base, root / "b", seed=42),
        "c": make_adapter(base, root / "c", seed=43, r=8),
    }


def logits(engine, name):
    return engine.logits([Request(IMAGE_PROMPT, [image(0)], name), Request(TEXT_PROMPT, [], name)])


def reference(llava, name):
    folder = llava[name] if name != BASE else None
    return [
        peft_logits(llava["base"], folder, IMAGE_PROMPT, [image(0)]),
        peft_logits(llava["base"], folder, TEXT_PROMPT, []),
    ]


def same(got, want):
    return all(
        g.shape == w.shape and torch.allclose(g, w, atol=1e-4, rtol=1e-4)
        for g, w in zip(got, want, strict=True)
    )


def lora_names(engine):
    """Adapter names PEFT's layers hold (LoRA factors and modules_to_save copies), independent of the registry."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    names = set()
    for module in engine.model.modules():
        if isinstance(module, LoraLayer):
            names |= set(module.lora_A)
        elif isinstance(module, ModulesToSaveWrapper):
            names |= set(module.modules_to_save)
    return names


def test_remove_adapter_detaches_it_and_the_name_can_be_reused(llava):
    engine = load(llava["base"], {"a": llava["a"], "b": llava["b"]}, device="cpu", default_adapter="a")
    base_before, b_before = logits(engine, BASE), logits(engine, "b")
    sha_a = engine.adapters["a"].sha256
    assert lora_names(engine) == {"ad_a", "ad_b"}
    early = engine.prepare([Request(TEXT_PROMPT, [], "a")])
    assert early[0].sha256 == sha_a

    engine.remove_adapter("a")
    with pytest.raises(
        InferenceError, match=r"adapter\(s\) a were removed or replaced .* prepare them again"
    ):
        engine.encode(early)
    removed = engine.route(["a", "b"])
    with pytest.raises(InferenceError, match=r"adapter\(s\) a were removed after these rows were prepared"):
        removed.__enter__()
    assert list(engine.adapters) == ["b"]
    assert list(engine.peft.peft_config) == ["ad_b"] and lora_names(engine) == {"ad_b"}
    assert engine.default_adapter is None
    with pytest.raises(InferenceError, match=r"no adapter called 'a' is loaded \(loaded: b;"):
        logits(engine, "a")
    with pytest.raises(InferenceError, match=r"no adapter called 'a' is loaded \(loaded: b\)"):
        engine.remove_adapter("a")
    assert all(torch.equal(x, y) for x, y in zip(logits(engine, BASE), base_before, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(logits(engine, "b"), b_before, strict=True))
    assert same(logits(engine, BASE), reference(llava, BASE))

    info = engine.add_adapter("a", llava["c"])  # the same name, another folder
    assert info.path == llava["c"] and info.sha256 != sha_a
    with pytest.raises(InferenceError, match="removed or replaced"):
        engine.encode(early)  # rows prepared for the old 'a' never run under the new one
    assert engine.prepare([Request(TEXT_PROMPT, [], "a")])[0].sha256 == info.sha256
    assert same(logits(engine, "a"), reference(llava, "c"))
    assert not same(logits(engine, "a"), reference(llava, "a"))
    mixed = engine.logits([Request(IMAGE_PROMPT, [image(0)], n) for n in ("a", "b", BASE)])
    assert same(mixed, [reference(llava, n)[0] for n in ("c", "b", BASE)])

    engine.remove_adapter("a")
    engine.remove_adapter("b")
    assert engine.adapters == {} and engine.peft is None and engine.model is engine.base_model
    assert lora_names(engine) == set()
    assert same(logits(engine, BASE), reference(llava, BASE))


def test_the_content_hash_follows_the_files_not_the_folder(llava, tmp_path):
    copy = shutil.copytree(llava["b"], tmp_path / "copy")
    (copy / "optimizer.pt").write_bytes(b"trainer state, not part of the adapter")
    (copy / "README.md").write_text("notes")
    changed = shutil.copytree(llava["b"], tmp_path / "changed")
    config = json.loads((changed / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 2
    (changed / "adapter_config.json").write_text(json.dumps(config))
    templated = shutil.copytree(llava["b"], tmp_path / "templated")
    from transformers import AutoProcessor

    template = AutoProcessor.from_pretrained(llava["base"]).chat_template
    (templated / "chat_template.jinja").write_text(template + " ")

    engine = load(
        llava["base"],
        {"b": llava["b"], "copy": copy, "changed": changed, "templated": templated, "other": llava["c"]},
        device="cpu",
    )
    sha = {name: info.sha256 for name, info in engine.adapters.items()}
    assert len(sha["b"]) == 64 and int(sha["b"], 16) >= 0
    assert sha["copy"] == sha["b"]  # same weights and configs: same answers, same caches
    assert len({sha["b"], sha["changed"], sha["templated"], sha["other"]}) == 4
    assert not same(logits(engine, "changed"), logits(engine, "b"))  # the config change does change answers
    again = load(llava["base"], {"b": llava["b"]}, device="cpu")
    assert again.adapters["b"].sha256 == sha["b"]  # stable across loads
