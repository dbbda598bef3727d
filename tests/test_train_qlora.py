"""QLoRA on CPU (bitsandbytes 0.50 runs 4-bit and 8-bit layers without a GPU): training on the quantized
base checkpoints and resumes exactly; the engine predicts with the adapter on a quantized base as PEFT does
on transformers' own quantized load; and the merge into the *unquantized* base answers like the adapter on
its quantized base, within the base's own quantization error."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

import vlmtune
from vlmtune import families
from vlmtune.demo import write_split
from vlmtune.infer import Request
from vlmtune.infer.quant import bnb_config
from vlmtune.training import run

pytestmark = pytest.mark.slow


def config(base, data, out, **extra) -> dict:
    return {
        "model": str(base),
        "output_dir": str(out),
        "data": {"train": str(data)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "quantization": "4bit",
        "lr": 5e-3,
        "scheduler": "constant",  # so a run cut at step 2 and continued to 4 follows the same lr
        "max_steps": 4,
        "batch_size": 2,
        "save_steps": 2,
        "logging_steps": 1,
        "precision": "fp32",
        "seed": 1,
        **extra,
    }


class Probe(TrainerCallback):
    """Which Linear classes the trained model holds, by role."""

    def __init__(self) -> None:
        self.classes: dict[str, set[str]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        family = families.get("qwen2_vl")
        for name, module in model.named_modules():
            if type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Linear") and "lora_" not in name:
                role = family.role_of(name.removeprefix("base_model.model.")) or "other"
                self.classes.setdefault(role, set()).add(type(module).__name__)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    base = tiny_model("qwen2_vl")
    data = write_split(root / "data", "train", 8, 0)
    probe = Probe()
    full = run(config(base, data, root / "full"), callbacks=[probe])
    return base, data, root, full, probe


def test_the_language_model_is_quantized_and_the_rest_is_not(trained):
    *_, probe = trained
    assert probe.classes["language"] == {"Linear4bit"}
    assert "Linear4bit" not in probe.classes["vision"] | probe.classes.get("projector", set())


def test_qlora_checkpoints_and_resumes_exactly(trained):
    base, data, root, full, _ = trained
    assert (full / "checkpoints" / "step-2" / "adapter_model.safetensors").is_file()
    cut = root / "cut"
    run(config(base, data, cut, max_steps=2))
    (cut / "adapter").rename(cut / "first-half")  # a finished run cannot resume: keep its checkpoints only
    resumed = run(config(base, data, cut))
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3


def prompt(root):
    image = root / "probe.png"
    Image.new("RGB", (56, 56), (200, 30, 30)).save(image)
    return Request("<image>What colour is the shape?", images=[str(image)])


def reference_logits(model, processor, request: Request) -> torch.Tensor:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=[text], images=[Image.open(request.images[0]).convert("RGB")], return_tensors="pt"
    )
    with torch.no_grad():
        return model(**inputs).logits[0].float()


def test_predict_on_a_quantized_base_matches_peft_and_the_merge_stays_within_quantization_error(trained):
    from peft import PeftModel

    base, _, root, full, _ = trained
    adapter = full / "adapter"
    request = prompt(root)
    engine = vlmtune.load(base, {"q": adapter}, quantization="4bit", device="cpu")
    ours = engine.logits(Request(request.messages, images=request.images, adapter="q"))[0]
    processor = AutoProcessor.from_pretrained(base)
    family = families.get("qwen2_vl")
    quantized = AutoModelForImageTextToText.from_pretrained(
        base,
        dtype=torch.float32,
        quantization_config=bnb_config("4bit", family, torch.float32),
        device_map={"": "cpu"},
    )
    qlora = reference_logits(PeftModel.from_pretrained(quantized, adapter), processor, request)
    assert (ours - qlora).abs().max().item() <= 1e-4

    # The merge goes into the unquantized base (a quantized base is refused by `merge`).
    merged = vlmtune.merge(base, adapter, root / "merged")
    merged_logits = reference_logits(
        AutoModelForImageTextToText.from_pretrained(merged.out), processor, request
    )
    full_base = reference_logits(AutoModelForImageTextToText.from_pretrained(base), processor, request)
    quant_base = reference_logits(
        AutoModelForImageTextToText.from_pretrained(
            base,
            dtype=torch.float32,
            quantization_config=bnb_config("4bit", family, torch.float32),
            device_map={"": "cpu"},
        ),
        processor,
        request,
    )
    quantization_error = (full_base - quant_base).abs().max().item()
    # Stated tolerance: the merged model differs from the QLoRA adapter on its quantized base by no more
    # than twice the base's own 4-bit quantization error (the adapter adds none of its own).
    assert (merged_logits - qlora).abs().max().item() <= 2 * quantization_error + 1e-4
    assert (merged_logits - full_base).abs().max().item() > 1e-3  # the adapter changed the answer


def test_8bit_trains_and_predicts(trained):
    base, data, root, _, _ = trained
    out = run(config(base, data, root / "int8", quantization="8bit", max_steps=2, save_steps=2))
    engine = vlmtune.load(base, {"q": out / "adapter"}, quantization="8bit", device="cpu")
    request = prompt(root)
    (generation,) = engine.generate([Request(request.messages, images=request.images, adapter="q")])
    assert generation.text is not None
