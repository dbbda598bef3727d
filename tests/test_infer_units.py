"""Pure-Python parts of the engine: batch planning and request normalisation (no model)."""

from __future__ import annotations

import pytest

from vlmtune.conversation import Conversation, ConversationError, Message, from_placeholders, from_request
from vlmtune.errors import VlmtuneError
from vlmtune.infer.batching import Row, mix_class, plan
from vlmtune.infer.types import BASE, GenerationSettings, canonical_adapter


def rows(spec):
    return [Row(i, adapter, proc, images) for i, (adapter, proc, images) in enumerate(spec)]


def test_mixable_adapters_and_base_share_batches_in_order():
    classes = {"a": mix_class("a", True), "b": mix_class("b", True), "v": mix_class("v", False)}
    spec = [("a", "p", False), ("v", "p", False), ("b", "p", False), (BASE, "p", False), ("v", "p", False)]
    assert plan(rows(spec), classes, batch_size=8) == [[0, 2, 3], [1, 4]]
    assert plan(rows(spec), classes, batch_size=2) == [[0, 2], [3], [1, 4]]


def test_processors_and_image_groups_split_batches():
    classes = {"a": mix_class("a", True), "b": mix_class("b", True)}
    spec = [("a", "p", False), ("b", "q", False), ("a", "p", True), (BASE, "q", False)]
    assert plan(rows(spec), classes, batch_size=8) == [[0], [1, 3], [2]]


def test_base_rows_alone_and_one_adapter_at_a_time():
    solo = {"a": mix_class("a", False), "b": mix_class("b", False)}
    spec = [("a", "p", False), (BASE, "p", False), ("b", "p", False), ("a", "p", False)]
    assert plan(rows(spec), solo, batch_size=8) == [[0, 3], [2], [1]]
    with pytest.raises(VlmtuneError, match="batch size must be at least 1"):
        plan(rows(spec), solo, batch_size=0)


def template(text):
    return Conversation((Message("user", from_placeholders(text)),)).to_template()[0]["content"]


def test_placeholders_become_parts():
    assert template("<image>\nWhat?") == [{"type": "image"}, {"type": "text", "text": "What?"}]
    assert template("a<image>b<image>") == [
        {"type": "text", "text": "a"},
        {"type": "image"},
        {"type": "text", "text": "b"},
        {"type": "image"},
    ]
    assert Message("user", from_placeholders("<image>\nWhat?")).text == "<image>\nWhat?"  # kept as written


def test_normalize_matches_images_to_slots():
    chat = from_request("<image>hi", ["x.png"])
    assert chat.to_template() == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}
    ]
    assert chat.images == ("x.png",)
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
        {"type": "text", "text": "?"},
    ]
    assert from_request([{"role": "user", "content": parts}], []).images == ("data:image/png;base64,AAA",)
    with pytest.raises(ConversationError, match="2 image placeholder"):
        from_request("<image><image>", ["x.png"])
    with pytest.raises(ConversationError, match="either inside the message parts or in `images`"):
        from_request([{"role": "user", "content": parts}], ["y.png"])
    with pytest.raises(ConversationError, match="images go in user turns"):
        from_request(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<image>"}], ["y.png"]
        )
    with pytest.raises(ConversationError, match="role 'bot'"):
        from_request([{"role": "bot", "content": "a"}], [])


def test_settings_and_names():
    assert canonical_adapter("None") == BASE and canonical_adapter("__base__") == BASE
    assert canonical_adapter("a") == "a" and canonical_adapter(None) is None
    with pytest.raises(Exception, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(Exception, match="temperature"):
        GenerationSettings(do_sample=True, temperature=0)


def test_linear_stack_equals_peft_mixed_batch_forward():
    """The concatenated-factors delta equals PEFT's per-adapter loop, for different ranks, scalings, a LoRA
    bias, rows of the base and rows whose adapter does not touch this layer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from vlmtune.infer.mixed import LinearStack, plain_linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    peft = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=3, target_modules=["0"], init_lora_weights=False), "x"
    )
    peft.add_adapter(
        "y",
        LoraConfig(
            r=5, lora_alpha=7, use_rslora=True, lora_bias=True, target_modules=["0"], init_lora_weights=False
        ),
    )
    peft.add_adapter("z", LoraConfig(r=3, target_modules=["0"], init_lora_weights=False))
    layer = peft.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["y"].bias.normal_()
    layer.eval()
    rows = ["y", "__base__", "x", "z", "y", "x"]
    x = torch.randn(len(rows), 3, 12)
    with torch.no_grad():
        want = layer(x, adapter_names=rows)
        present = {"x", "y"}  # 'z' rows get no delta from the stack: as if 'z' did not touch this layer
        assert plain_linear(layer, present)
        got = layer.base_layer(x) + LinearStack(layer, rows, present).delta(x)
        z_rows = [i for i, r in enumerate(rows) if r == "z"]
        want_without_z = want.clone()
        want_without_z[z_rows] = layer(x[z_rows], adapter_names=["__base__"] * len(z_rows))
    torch.testing.assert_close(got, want_without_z, atol=1e-5, rtol=1e-5)
