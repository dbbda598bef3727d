"""The engine against independent references, on tiny folders of all four families: plain
`PeftModel.from_pretrained` logits, a fresh single-adapter load, and the base model alone."""

from __future__ import annotations

import pytest
import torch

from test_infer_fixtures import (
    IMAGE_PROMPT,
    LM_REGEX,
    PROJECTOR,
    TEXT_PROMPT,
    VISION_REGEX,
    image,
    make_adapter,
    peft_logits,
)
from vlmtune.infer import BASE, GenerationSettings, Request, load

ATOL = 1e-4


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """Per family: 'a' (LM LoRA r=4 + projector trained in full), 'b' (LM LoRA r=8 on q/v + lm_head in
    full), 'c' (rsLoRA r=4 on all LM projections), 'v' (vision-tower LoRA + LM LoRA), 'd' (DoRA on the LM)."""
    made: dict[str, dict[str, object]] = {}

    def get(family: str) -> dict[str, object]:
        if family not in made:
            base = tiny_model(family)
            root = tmp_path_factory.mktemp(f"adapters-{family}")
            made[family] = {
                "base": base,
                "a": make_adapter(base, root / "a", seed=1, modules_to_save=[PROJECTOR[family]]),
                "b": make_adapter(
                    base,
                    root / "b",
                    seed=2,
                    r=8,
                    alpha=4,
                    target_modules=r".*(?:language_model|text_model).*\.(q_proj|v_proj)",
                    modules_to_save=["lm_head"],
                ),
                "c": make_adapter(base, root / "c", seed=5, use_rslora=True),
                "v": make_adapter(
                    base, root / "v", seed=3, target_modules=f"{VISION_REGEX[family]}|{LM_REGEX}"
                ),
                "d": make_adapter(base, root / "d", seed=4, use_dora=True),
            }
        return made[family]

    return get


def req(messages, adapter, with_image=True):
    return Request(messages, [image(0)] if with_image else [], adapter)


def close(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and torch.allclose(x, y, atol=ATOL, rtol=1e-4)


def test_unmerged_logits_equal_peft_from_pretrained(family_name, adapters):
    ad = adapters(family_name)
    engine = load(ad["base"], {"a": ad["a"]}, device="cpu")
    got_image, got_text = engine.logits([req(IMAGE_PROMPT, "a"), req(TEXT_PROMPT, "a", False)])
    want_image = peft_logits(ad["base"], ad["a"], IMAGE_PROMPT, [image(0)])
    want_text = peft_logits(ad["base"], ad["a"], TEXT_PROMPT, [])
    assert close(got_image, want_image), (got_image - want_image).abs().max()
    assert close(got_text, want_text), (got_text - want_text).abs().max()
    # The adapter does change the output (else the comparison proves nothing).
    base_only = peft_logits(ad["base"], None, IMAGE_PROMPT, [image(0)])
    assert (want_image - base_only).abs().max() > 1e-2


def test_base_alone_equals_the_base_model(family_name, adapters):
    ad = adapters(family_name)
    engine = load(ad["base"], {"a": ad["a"], "b": ad["b"]}, device="cpu")
    for name in (BASE, "none", "NONE"):
        got = engine.logits(req(IMAGE_PROMPT, name))[0]
        assert close(got, peft_logits(ad["base"], None, IMAGE_PROMPT, [image(0)]))


def test_two_adapters_sequential_switched_and_mixed_equal_fresh_loads(family_name, adapters):
    """Each adapter's output on a shared base equals a fresh single-adapter load of it, whether requests
    come one adapter after the other, alternating, or mixed in one batch. 'b' and 'c' share a forward
    ('b' trains lm_head in full, 'c' does not); 'a' (projector trained) joins the same call, grouped."""
    ad = adapters(family_name)
    prompts = [(IMAGE_PROMPT, True), (TEXT_PROMPT, False)]
    fresh = {}
    for name in ("a", "b", "c"):
        single = load(ad["base"], {name: ad[name]}, device="cpu")
        fresh[name] = [single.logits(req(m, name, i))[0] for m, i in prompts]
    fresh[BASE] = [peft_logits(ad["base"], None, m, [image(0)] if i else []) for m, i in prompts]
    engine = load(ad["base"], {"b": ad["b"], "c": ad["c"]}, device="cpu")
    assert engine.adapters["b"].mixable and engine.adapters["c"].mixable

    sequential = [("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    switched = [("c", 1), ("b", 0), ("c", 0), ("b", 1), (BASE, 0)]
    for order in (sequential, switched):
        for name, p in order:
            got = engine.logits(req(prompts[p][0], name, prompts[p][1]))[0]
            assert close(got, fresh[name][p]), (order, name, p)
    engine.add_adapter("a", ad["a"])
    assert not engine.adapters["a"].mixable
    mixed = [("b", 0), ("c", 0), (BASE, 0), ("a", 0), ("c", 1), ("b", 1), (BASE, 1), ("a", 1)]
    got = engine.logits([req(prompts[p][0], name, prompts[p][1]) for name, p in mixed], batch_size=8)
    for (name, p), logits in zip(mixed, got, strict=True):
        assert close(logits, fresh[name][p]), (name, p, (logits - fresh[name][p]).abs().max())


def test_mixed_batch_runs_in_one_forward(adapters, monkeypatch):
    """Language-model-only adapters share one forward, not one per adapter."""
    ad = adapters("qwen2_vl")
    engine = load(ad["base"], {"b": ad["b"], "c": ad["c"]}, device="cpu")
    calls = []
    forward = engine.base_model.forward
    monkeypatch.setattr(engine.base_model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    engine.logits([req(IMAGE_PROMPT, n) for n in ("c", "b", BASE, "b")], batch_size=8)
    assert len(calls) == 1
    engine.mixed_batches = False  # one adapter per forward
    engine.logits([req(IMAGE_PROMPT, n) for n in ("c", "b", BASE, "b")], batch_size=8)
    assert len(calls) == 1 + 3


def test_mixed_generation_equals_single_adapter_generation(family_name, adapters):
    ad = adapters(family_name)
    settings = GenerationSettings(max_new_tokens=6)
    want = {}
    for name in ("b", "c"):
        single = load(ad["base"], {name: ad[name]}, device="cpu")
        want[name] = single.generate(req(IMAGE_PROMPT, name), settings)[0].text
    engine = load(ad["base"], {"b": ad["b"], "c": ad["c"]}, device="cpu")
    want[BASE] = engine.generate(req(IMAGE_PROMPT, BASE), settings)[0].text
    names = ["b", "c", BASE, "c", "b"]
    got = engine.generate([req(IMAGE_PROMPT, n) for n in names], settings, batch_size=8)
    assert [g.text for g in got] == [want[n] for n in names]
    assert [g.adapter for g in got] == names
    assert len({want["b"], want["c"], want[BASE]}) == 3  # the adapters do differ
    assert all(0 < g.generated_tokens <= 6 for g in got)


def test_vision_lora_and_dora_fall_back_to_grouping(family_name, adapters):
    """Adapters PEFT cannot route per row (LoRA inside the vision tower, DoRA) run grouped by adapter, with
    the same results as fresh single loads, also when mixed with routable adapters in one call."""
    ad = adapters(family_name)
    engine = load(ad["base"], {"v": ad["v"], "d": ad["d"], "b": ad["b"]}, device="cpu")
    assert not engine.adapters["v"].mixable and "vision" in engine.adapters["v"].not_mixable_because
    assert not engine.adapters["d"].mixable and "DoRA" in engine.adapters["d"].not_mixable_because
    names = ["v", "d", "b", BASE, "v", "d"]
    got = engine.logits([req(IMAGE_PROMPT, n) for n in names], batch_size=8)
    for name, logits in zip(names, got, strict=True):
        want = peft_logits(ad["base"], ad[name] if name != BASE else None, IMAGE_PROMPT, [image(0)])
        assert close(logits, want), (name, (logits - want).abs().max())


def test_bf16_base(adapters):
    """On a bf16 base, a single adapter gives PEFT's logits exactly, and a mixed batch (LoRA in fp32, as
    PEFT keeps it) agrees within bf16 rounding."""
    ad = adapters("qwen2_vl")
    engine = load(ad["base"], {"b": ad["b"], "c": ad["c"]}, device="cpu", dtype="bf16")
    want = {n: peft_logits(ad["base"], ad[n], IMAGE_PROMPT, [image(0)], torch.bfloat16) for n in ("b", "c")}
    for n in ("b", "c"):
        assert torch.equal(engine.logits(req(IMAGE_PROMPT, n))[0], want[n])
    for n, got in zip(
        ["c", "b", "c"], engine.logits([req(IMAGE_PROMPT, n) for n in ("c", "b", "c")]), strict=True
    ):
        assert (got - want[n]).abs().max() <= 0.02 * want[n].abs().max()


def test_processor_and_chat_template_from_the_adapter_folder(adapters, tmp_path):
    """An adapter folder's own processor (training-time image limits, chat template) is used for its rows;
    one with only a chat template gets the base's processor with that template; a copy of the base's
    processor shares the base's batches."""
    import shutil

    from transformers import AutoProcessor

    ad = adapters("qwen2_vl")
    own = shutil.copytree(ad["c"], tmp_path / "own")
    processor = AutoProcessor.from_pretrained(ad["base"])
    processor.chat_template = processor.chat_template.replace(
        "You are a helpful assistant.", "Answer in colours."
    )
    processor.image_processor.max_pixels = 28 * 28 * 4
    processor.save_pretrained(own)
    template = shutil.copytree(ad["b"], tmp_path / "template")
    (template / "chat_template.jinja").write_text(processor.chat_template.replace("colours", "shapes"))
    same = shutil.copytree(ad["b"], tmp_path / "same")
    AutoProcessor.from_pretrained(ad["base"]).save_pretrained(same)

    engine = load(ad["base"], {"own": own, "template": template, "same": same}, device="cpu")
    assert engine.adapters["own"].processor == str(own)
    assert engine.adapters["template"].processor == str(template)
    assert engine.adapters["same"].processor == "base"
    assert "Answer in colours." in engine.prepare(req(IMAGE_PROMPT, "own"))[0].text
    assert "Answer in shapes." in engine.prepare(req(IMAGE_PROMPT, "template"))[0].text
    assert "You are a helpful assistant." in engine.prepare(req(IMAGE_PROMPT, "same"))[0].text
    big = [image(0, size=112)]
    got = engine.logits([Request(IMAGE_PROMPT, big, n) for n in ("own", "same", BASE)])
    # 'own' is encoded by its own processor (its template; the 112-px image cut to its 56-px limit).
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(ad["base"]), own).eval()
    text = processor.apply_chat_template(IMAGE_PROMPT, add_generation_prompt=True, tokenize=False)
    with torch.inference_mode():
        want = model(**processor(text=[text], images=[big], return_tensors="pt")).logits[0]
    assert close(got[0], want)
    assert got[0].shape[0] < got[1].shape[0]  # fewer image tokens under the tighter pixel limit


def test_sampling_is_reproducible_with_a_seed_and_capped(adapters):
    ad = adapters("llava")
    engine = load(ad["base"], {"a": ad["a"]}, device="cpu")
    settings = GenerationSettings(max_new_tokens=5, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    first = engine.generate(req(IMAGE_PROMPT, "a"), settings)[0]
    again = engine.generate(req(IMAGE_PROMPT, "a"), settings)[0]
    assert first.text == again.text
    assert first.generated_tokens <= 5
    assert first.finish_reason in ("stop", "length")


def test_requests_are_checked_before_any_generation(adapters):
    ad = adapters("qwen2_vl")
    engine = load(ad["base"], {"a": ad["a"], "b": ad["b"]}, device="cpu")
    with pytest.raises(Exception, match="several adapters are loaded"):
        engine.generate(Request("hello"))
    with pytest.raises(Exception, match="no adapter called 'c'"):
        engine.generate([Request("hello", adapter="a"), Request("hello", adapter="c")])
    with pytest.raises(Exception, match="1 image placeholder"):
        engine.generate(Request("<image>what is it?", [], "a"))
