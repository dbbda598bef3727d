"""Row routing for mixed batches: the one regroup loop behind `generate` and `logits`, and the seam a
scheduler drives (prepare -> plan -> encode -> route), against single-adapter runs and plain PEFT."""

from __future__ import annotations

import pytest
import torch

from test_infer_fixtures import (
    IMAGE_PROMPT,
    LM_REGEX,
    TEXT_PROMPT,
    VISION_REGEX,
    image,
    make_adapter,
    peft_logits,
)
from vlmtune.infer import BASE, GenerationSettings, InferenceError, Request, RowMismatch, load
from vlmtune.infer.generation import stop_tokens
from vlmtune.infer.routing import run_batches

ATOL = 1e-4


def close(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and torch.allclose(x, y, atol=ATOL, rtol=1e-4)


@pytest.fixture(scope="module")
def qwen(tiny_model, tmp_path_factory):
    """'v': LoRA in the vision tower and the language model; 'b', 'c': language model only."""
    base = tiny_model("qwen2_vl")
    root = tmp_path_factory.mktemp("routing")
    return {
        "base": base,
        "v": make_adapter(base, root / "v", seed=31, target_modules=f"{VISION_REGEX['qwen2_vl']}|{LM_REGEX}"),
        "b": make_adapter(base, root / "b", seed=32, target_modules=r".*language_model.*\.(q_proj|v_proj)"),
        "c": make_adapter(base, root / "c", seed=33, use_rslora=True),
    }


def misjudged(qwen):
    """An engine that wrongly believes the vision-LoRA adapter 'v' can share a forward: the forward must
    find out (its vision layers see image patches, not rows), regroup, and still give exact results."""
    engine = load(qwen["base"], {"v": qwen["v"], "b": qwen["b"]}, device="cpu")
    info = engine.adapters["v"]
    assert not info.mixable  # known from its roles; pretend it is not
    info.mixable, info.not_mixable_because = True, None
    return engine


def test_a_batch_that_cannot_be_routed_is_regrouped_for_logits(qwen, monkeypatch):
    engine = misjudged(qwen)
    calls = []
    forward = engine.base_model.forward
    monkeypatch.setattr(engine.base_model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    names = ["v", "b", BASE, "v"]
    got = engine.logits([Request(IMAGE_PROMPT, [image(0)], n) for n in names], batch_size=8)
    assert not engine.adapters["v"].mixable
    assert "not one per batch row" in engine.adapters["v"].not_mixable_because
    assert "model.visual.blocks" in engine.adapters["v"].not_mixable_because
    assert engine.adapters["b"].mixable  # only the adapter that changes that layer is demoted
    assert len(calls) == 3  # the mixed try (stopped in the vision tower), then 'v' alone, then 'b' + base
    for name, logits in zip(names, got, strict=True):
        want = peft_logits(qwen["base"], qwen[name] if name != BASE else None, IMAGE_PROMPT, [image(0)])
        assert close(logits, want), (name, (logits - want).abs().max())


def test_a_batch_that_cannot_be_routed_is_regrouped_for_generation(qwen):
    settings = GenerationSettings(max_new_tokens=5)
    want = {}
    for name in ("v", "b"):
        single = load(qwen["base"], {name: qwen[name]}, device="cpu")
        want[name] = single.generate(Request(IMAGE_PROMPT, [image(0)], name), settings)[0].text
    engine = misjudged(qwen)
    want[BASE] = engine.generate(Request(IMAGE_PROMPT, [image(0)], BASE), settings)[0].text
    names = ["v", "b", BASE, "v", "b"]
    done = []
    got = engine.generate(
        [Request(IMAGE_PROMPT, [image(0)], n) for n in names], settings, batch_size=8, progress=done.append
    )
    assert [g.text for g in got] == [want[n] for n in names]
    assert [g.adapter for g in got] == names
    assert not engine.adapters["v"].mixable
    assert sorted(done) == [2, 3]  # progress counts the batches that ran: 'v' twice, 'b' + base
    assert len(set(want.values())) == 3  # the adapters do differ


def test_run_batches_replans_only_the_batch_that_raised():
    """The loop itself: a batch whose step raises RowMismatch is replanned (at its own size) and its parts
    run before the batches after it; every row runs exactly once."""
    split = set()

    def plan(indices, size):
        indices = list(indices)
        if split.intersection(indices):
            return [[i] for i in indices]
        return [indices[i : i + size] for i in range(0, len(indices), size)]

    ran = []

    def step(batch):
        if 1 in batch and len(batch) > 1:
            split.add(1)
            raise RowMismatch("layer", len(batch), 99)
        ran.append(batch)

    run_batches(plan, range(6), 3, step)
    assert ran == [[0], [1], [2], [3, 4, 5]]


def test_the_seam_prefill_and_decode_steps_equal_generate(qwen):
    """prepare -> plan -> encode -> route, with a hand-written greedy decode loop over the KV cache (what a
    continuous-batching scheduler does), gives the texts `generate` gives for the same mixed batch."""
    engine = load(qwen["base"], {"b": qwen["b"], "c": qwen["c"]}, device="cpu")
    settings = GenerationSettings(max_new_tokens=5)
    requests = [Request(TEXT_PROMPT, [], n) for n in ("b", "c", BASE, "c")]
    rows = engine.prepare(requests)
    (batch,) = engine.plan(rows, 8)
    assert batch == [0, 1, 2, 3]
    inputs = engine.encode([rows[i] for i in batch])
    adapters = [rows[i].adapter for i in batch]
    stops = stop_tokens(engine.generation_config(settings))
    tokens = []
    with torch.inference_mode(), engine.route(adapters):
        out = engine.model(**inputs, use_cache=True)
        mask = inputs["attention_mask"]
        for _ in range(settings.max_new_tokens):
            step = out.logits[:, -1].argmax(-1)
            tokens.append(step)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = engine.model(
                input_ids=step[:, None],
                attention_mask=mask,
                cache=out.cache,
                use_cache=True,
            )
    tokenizer = engine.processor_for(BASE).tokenizer
    got = []
    for row in torch.stack(tokens, dim=1).tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        got.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    # generate() after the hand loop: Qwen2-VL keeps rope deltas of the last generate() on the model, which a
    # hand loop without explicit position ids would pick up.
    want = [g.text for g in engine.generate(requests, settings)]
    assert got == want
    assert len(set(want[:3])) == 3


def test_route_raises_for_a_layer_fed_patches_and_marks_the_adapter(qwen):
    """A scheduler using `route` directly sees RowMismatch, and the next `plan` keeps the rows apart."""
    engine = misjudged(qwen)
    rows = engine.prepare([Request(IMAGE_PROMPT, [image(0)], n) for n in ("v", "b")])
    (batch,) = engine.plan(rows, 8)
    inputs = engine.encode([rows[i] for i in batch])

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in engine.model.modules())

    before = hooks()
    with (
        pytest.raises(RowMismatch, match=r"model\.visual\.blocks\.\d+\.attn"),
        torch.inference_mode(),
        engine.route(["v", "b"]),
    ):
        engine.model(**inputs)
    assert hooks() == before  # the routing hooks are gone
    assert not engine.adapters["v"].mixable
    assert engine.plan(rows, 8) == [[0], [1]]
    want = peft_logits(qwen["base"], qwen["b"], IMAGE_PROMPT, [image(0)])
    assert close(engine.logits(Request(IMAGE_PROMPT, [image(0)], "b"))[0], want)


def test_encode_refuses_rows_of_different_processors(qwen, tmp_path):
    import shutil

    own = shutil.copytree(qwen["b"], tmp_path / "own")
    (own / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    engine = load(qwen["base"], {"own": own}, device="cpu")
    rows = engine.prepare([Request("hi", [], "own"), Request("hi", [], BASE)])
    assert engine.plan(rows, 8) == [[0], [1]]
    with pytest.raises(InferenceError, match="different processors"):
        engine.encode(rows)
