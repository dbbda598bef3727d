"""Quantized bases under un-merged adapters (bitsandbytes): CUDA machines only, skipped elsewhere.

The reference is PEFT's own `PeftModel.from_pretrained` on the base quantized the same way by plain
transformers (NF4 4-bit / LLM.int8, vision tower and lm_head kept), so the comparison is exact up to bf16
rounding; the fp32 model differs from both by the quantization error."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from test_infer_fixtures import IMAGE_PROMPT, PROJECTOR, encode, image, make_adapter
from vlmtune.infer import Request, load

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes"),
]


def quantized_peft_logits(base, adapter, mode):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    skip = ["model.visual", "lm_head"]
    if mode == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=skip,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    model = AutoModelForImageTextToText.from_pretrained(
        base, quantization_config=config, dtype=torch.bfloat16, device_map={"": 0}
    )
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        inputs = encode(base, IMAGE_PROMPT, [image(0)]).to("cuda").to(torch.bfloat16)
        return model.eval()(**inputs).logits[0].float().cpu()


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_base_with_unmerged_adapters(tiny_model, tmp_path, mode):
    base = tiny_model("qwen2_vl", size="small")
    a = make_adapter(base, tmp_path / "a", seed=1)
    b = make_adapter(base, tmp_path / "b", seed=2, modules_to_save=[PROJECTOR["qwen2_vl"]])
    engine = load(base, {"a": a, "b": b}, quantization=mode, dtype="bf16")
    q_proj = engine.base_model.model.language_model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    assert type(engine.base_model.model.visual.blocks[0].attn.qkv).__name__ == "Linear"  # vision kept
    want = {n: quantized_peft_logits(base, ad, mode) for n, ad in (("a", a), ("b", b), ("none", None))}
    single = {n: engine.logits(Request(IMAGE_PROMPT, [image(0)], n))[0] for n in want}
    mixed = engine.logits([Request(IMAGE_PROMPT, [image(0)], n) for n in ("a", "b", "none", "a")])
    scale = want["a"].abs().max()
    for name, got in single.items():
        assert (got - want[name]).abs().max() <= 0.01 * scale, name
    # LLM.int8 picks its outlier columns over the whole batch: in 8-bit a row's result depends a little on
    # its batch mates (in PEFT as here), hence the wider tolerance for the mixed batch.
    tolerance = 0.03 if mode == "4bit" else 0.06
    for name, got in zip(("a", "b", "none", "a"), mixed, strict=True):
        assert (got - want[name]).abs().max() <= tolerance * scale, name
    assert (want["a"] - want["none"]).abs().max() > 0.1 * scale  # the adapter acts
    assert engine.generate(Request(IMAGE_PROMPT, [image(0)], "a"))[0].generated_tokens > 0
