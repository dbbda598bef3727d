"""Tiny checkpoints are real hub-style folders that plain transformers loads and runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtune import families, tiny

EXPECTED_PROCESSORS = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLImageProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor"),
    "llava": ("LlavaProcessor", "LlavaImageProcessor"),
    "mllama": ("MllamaProcessor", "MllamaImageProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen2VLImageProcessor"),
    "qwen3_5": ("Qwen3VLProcessor", "Qwen2VLImageProcessor"),
    "gemma3": ("Gemma3Processor", "Gemma3ImageProcessor"),
    "internvl": ("InternVLProcessor", "GotOcr2ImageProcessor"),
    "idefics3": ("Idefics3Processor", "Idefics3ImageProcessor"),
    "smolvlm": ("SmolVLMProcessor", "SmolVLMImageProcessor"),
    "llava_next": ("LlavaNextProcessor", "LlavaNextImageProcessor"),
    "llava_onevision": ("LlavaOnevisionProcessor", "LlavaOnevisionImageProcessor"),
    "glm4v": ("Glm4vProcessor", "Glm4vImageProcessor"),
}


def image(seed: int = 0, size: int = 56) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def conversation() -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
    ]


def images_arg(family_name: str, img):
    # Mllama's processor wants one list of images per text; the others take a flat list.
    return [[img]] if family_name == "mllama" else [img]


def test_folder_has_every_file_a_loader_needs(family_name, tiny_model):
    folder = tiny_model(family_name)
    names = {p.name for p in folder.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert required in names, f"{required} missing from {sorted(names)}"
    assert not any(n.startswith(".") for n in names)


def test_plain_transformers_loads_every_family_without_vlmtune(tiny_model, tmp_path):
    """A separate interpreter that never imports vlmtune loads model + processor through the Auto classes."""
    folders = {name: str(tiny_model(name)) for name in families.FAMILIES}
    script = textwrap.dedent(
        f"""
        import json, sys
        from transformers import AutoModelForImageTextToText, AutoProcessor
        out = {{}}
        for name, folder in {folders!r}.items():
            model = AutoModelForImageTextToText.from_pretrained(folder)
            processor = AutoProcessor.from_pretrained(folder)
            out[name] = [type(model).__name__, type(processor).__name__, type(processor.image_processor).__name__]
        assert not any(m.startswith("vlmtune") for m in sys.modules), "vlmtune was imported"
        print(json.dumps(out))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (model_cls, processor_cls, image_cls) in loaded.items():
        assert model_cls == families.get(name).architecture
        assert (processor_cls, image_cls) == EXPECTED_PROCESSORS[name]


def test_forward_with_image_and_labels_gives_finite_loss(family_name, tiny_model):
    folder = tiny_model(family_name)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(conversation(), tokenize=False)
    batch = processor(text=[text], images=images_arg(family_name, image()), return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    # The image reaches the model: another image changes the logits.
    other = processor(text=[text], images=images_arg(family_name, image(seed=1)), return_tensors="pt")
    with torch.no_grad():
        delta = (model(**batch).logits - model(**other).logits).abs().max()
    assert delta > 0


def test_chat_template_marks_exactly_the_assistant_turns(family_name, tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model(family_name))
    messages = [
        *conversation(),
        {"role": "user", "content": [{"type": "text", "text": "And the shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is a circle."}]},
    ]
    out = processor.apply_chat_template(
        messages, images=[image()], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = np.array(out["input_ids"][0])
    mask = np.array(out["assistant_masks"][0]).astype(bool)
    eos = processor.tokenizer.eos_token
    assert processor.tokenizer.decode(ids[mask]) == f"A red circle.{eos}It is a circle.{eos}"


def test_demo_words_are_single_tokens(family_name, tiny_model):
    tokenizer = AutoProcessor.from_pretrained(tiny_model(family_name)).tokenizer
    for word in ("red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle"):
        assert len(tokenizer.tokenize(word)) == 1, word
        assert len(tokenizer.tokenize(" " + word)) == 1, word


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_deterministic_for_a_seed(tmp_path):
    a = digest(tiny.write("qwen2_vl", tmp_path / "a", seed=3))
    b = digest(tiny.write("qwen2_vl", tmp_path / "b", seed=3))
    c = digest(tiny.write("qwen2_vl", tmp_path / "c", seed=4))
    assert [k for k in a if a[k] != b[k]] == []
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]


def test_refuses_to_overwrite_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tiny.write("llava", tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_small_size_is_in_the_benchmark_range(name):
    model, _ = tiny.build(name, size="small")
    n = sum(p.numel() for p in model.parameters())
    assert 20e6 <= n <= 60e6, n


def test_sharded_write_honours_max_shard_size(tmp_path):
    folder = tiny.write("qwen2_vl", tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) > 0
