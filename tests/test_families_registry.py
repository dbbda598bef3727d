"""The registry's promise: a family is one folder under `families/`, and nothing else names one.

A throw-away family package, written into a temp folder and registered in a temporary registry, goes
through tiny / inspect / target selection / adapter fit / merge plan with no edit anywhere else.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmtune import checkpoint, families, inspection, tiny
from vlmtune.families import KeyTable, Rename, UnsupportedModelError

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmtune"
FAMILY_WORDS = re.compile(r"qwen|llava|mllama|gemma|idefics|smolvlm|internvl|glm", re.IGNORECASE)

TOY_FAMILY = '''
"""A throw-away family: HF Llava under another name, stored in the hub layout."""
from vlmtune.families import Family, KeyTable, Rename, decoder_targets

FAMILY = Family(
    name="toy",
    model_types=("llava",),
    architecture="LlavaForConditionalGeneration",
    role_prefixes=(
        ("projector", "model.multi_modal_projector"),
        ("vision", "model.vision_tower"),
        ("embeddings", "model.language_model.embed_tokens"),
        ("language", "model.language_model"),
        ("lm_head", "lm_head"),
    ),
    lora_target_patterns={
        "language": decoder_targets("model.language_model.layers"),
        "projector": r"model\\.multi_modal_projector\\.linear_(?:1|2)",
    },
    keys=KeyTable((
        Rename("language_model.lm_head", "lm_head"),
        Rename("language_model.model", "model.language_model"),
        Rename("vision_tower", "model.vision_tower"),
        Rename("multi_modal_projector", "model.multi_modal_projector"),
    )),
)
'''

TOY_TINY = """
from vlmtune.families.tiny_kit import TEXT_CONTENT, TinySpec, content_with_images

TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: " + content_with_images("<image>") + "\\n"
    "{% else %}ASSISTANT: {% generation %}" + TEXT_CONTENT + "</s>{% endgeneration %}\\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def config(size, tokens, vocab_size):
    return {
        "model_type": "llava",
        "text_config": {
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": vocab_size,
            "bos_token_id": tokens["<s>"], "eos_token_id": tokens["</s>"], "pad_token_id": tokens["<pad>"],
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
        },
        "image_token_id": tokens["<image>"],
        "vision_feature_layer": -1,
    }


def processor(tokenizer, chat_template):
    from transformers import LlavaImageProcessor, LlavaProcessor

    side = {"height": 28, "width": 28}
    return LlavaProcessor(
        image_processor=LlavaImageProcessor(size={"shortest_edge": 28}, crop_size=side),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat_template,
    )


TINY = TinySpec(config, processor, TOKENS, TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    package = tmp_path / "pkgs" / "toyfam"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(TOY_FAMILY))
    (package / "tiny.py").write_text(textwrap.dedent(TOY_TINY))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    with families.scoped():
        yield families.register_module("toyfam")


def test_a_family_folder_is_all_it_takes(toy, tmp_path):
    from peft import LoraConfig, get_peft_model

    from vlmtune.adapters.inspect import inspect_adapter
    from vlmtune.adapters.targets import plan_targets
    from vlmtune.merging.plan import build_plan

    assert list(families.FAMILIES) == ["toy"]
    with pytest.raises(UnsupportedModelError, match="supported families: toy"):
        families.get("qwen2_vl")

    # tiny: a hub-layout folder that plain transformers loads; its key table read both ways
    folder = tiny.write("toy", tmp_path / "toy")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    index = checkpoint.tensor_index(folder)
    mapping = toy.runtime_index(index)
    assert set(mapping) == set(model.state_dict())
    assert toy.disk_layout(index) == "original"
    for runtime, disk in mapping.items():
        assert toy.to_disk(runtime, "original") == disk
    assert families.detect(model.config) is toy

    # inspect: the family, its roles and its default targets (2 layers x 7 projections)
    report = inspection.inspect_model(folder)
    assert report["family"] == "toy" and report["default_lora_targets"]["modules"] == 14
    assert report["default_lora_targets"]["roles"] == ["language"]

    # target selection, then a plain PEFT adapter that fits the base and plans a merge
    plan = plan_targets(model, toy, "language", projector="full")
    assert set(plan.lora_roles) == {"language"} and len(plan.lora_modules) == 14
    assert plan.full_modules == ["model.multi_modal_projector"]
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=2, target_modules=plan.target_regex, modules_to_save=plan.full_modules, init_lora_weights=False
        ),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    fit = inspect_adapter(tmp_path / "adapter", base=folder)
    assert fit["family"] == "toy" and fit["fit"]["fits"] is True, fit["fit"]
    merge = build_plan(folder, [tmp_path / "adapter"])
    counts = merge.counts()
    assert counts["merged"] == 14 and counts["replaced"] == 4  # linear_1/2 weight and bias
    assert [t.name for t in merge.tensors] == list(index)


def test_key_table_reads_both_ways():
    table = KeyTable(
        (
            Rename("visual", "model.visual"),
            Rename("model", "model.language_model", unless=("model.language_model", "model.visual")),
        )
    )
    assert table.to_runtime("model.layers.0.q.weight") == "model.language_model.layers.0.q.weight"
    assert table.to_runtime("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert table.to_runtime("visual.blocks.0.w") == "model.visual.blocks.0.w"
    assert table.to_runtime("visualize.w") == "visualize.w"  # prefixes match whole path segments
    assert table.to_runtime("lm_head.weight") == "lm_head.weight"
    assert table.to_disk("model.language_model.layers.0.q.weight") == [
        "model.layers.0.q.weight",
        "model.language_model.layers.0.q.weight",
    ]
    assert table.to_disk("model.visual.blocks.0.w") == ["visual.blocks.0.w", "model.visual.blocks.0.w"]
    assert table.to_disk("lm_head.weight") == ["lm_head.weight"]


def test_registry_refuses_two_families_for_one_model_type(toy):
    import dataclasses

    with pytest.raises(ValueError, match="model_type 'llava' belongs to both toy and other"):
        families.register(dataclasses.replace(toy, name="other"))


def code_words(path: Path) -> list[tuple[int, str]]:
    """Identifiers and string literals of a module, docstrings left out (they may name examples)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            words.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            words.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            words.append((node.lineno, node.name))
        elif isinstance(node, ast.arg):
            words.append((node.lineno, node.arg))
        elif isinstance(node, ast.alias):
            words.append((getattr(node, "lineno", 0), node.name))
            if node.asname:
                words.append((getattr(node, "lineno", 0), node.asname))
        elif isinstance(node, ast.keyword) and node.arg:
            words.append((node.value.lineno, node.arg))
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            words.extend((node.lineno, name) for name in node.names)
    return words


def test_no_family_name_in_code_outside_families():
    """Every identifier (names, attributes, definitions, arguments, keywords, imports) and every string
    literal outside `families/` and outside docstrings, help texts and error messages included: a data
    format is named for what it is (ShareGPT-style `conversations`), a foreign adapter format by its family."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if "families" in path.relative_to(SRC).parts:
            continue
        for line, word in code_words(path):
            if FAMILY_WORDS.search(word):
                found.append(f"{path.relative_to(SRC)}:{line}: {word[:80]!r}")
    assert found == []


def test_code_words_sees_every_kind_of_name(tmp_path):
    """The scan above is only as good as what `code_words` extracts: each kind of code token is seen,
    docstrings are not."""
    module = tmp_path / "m.py"
    module.write_text(
        textwrap.dedent(
            '''
            """Module docstring: llava."""
            import os as alias_qwen
            from os import path as path_gemma
            global_glm = 1
            class KlassIdefics:
                """Class docstring: smolvlm."""
            def fn_internvl(arg_mllama, **kw):
                """Function docstring: qwen."""
                global global_glm
                return call(keyword_llava=1, text="string_qwen", fmt=f"{arg_mllama}fstring_gemma")
            obj.attr_smolvlm = 2
            '''
        )
    )
    words = {word for _, word in code_words(module)}
    for expected in (
        "alias_qwen",
        "path_gemma",
        "global_glm",
        "KlassIdefics",
        "fn_internvl",
        "arg_mllama",
        "keyword_llava",
        "string_qwen",
        "fstring_gemma",
        "attr_smolvlm",
    ):
        assert expected in words, expected
    assert not any("docstring" in word for word in words)


def test_readme_families_tables_are_the_generated_ones():
    from vlmtune.families import support

    readme = (SRC.parents[1] / "README.md").read_text()
    start, end = readme.index(support.BEGIN), readme.index(support.END) + len(support.END)
    assert readme[start:end] == support.markdown(), (
        "README is stale: paste `python -m vlmtune.families.support`"
    )


def test_support_table_marks_what_a_family_cannot_do():
    from vlmtune.families import support

    assert support.support(families.get("gemma3"))["projector LoRA"] == "no: use `full`"
    assert support.support(families.get("mllama"))["vLLM after merge"].startswith("no: vLLM no longer serves")
    # a bare parameter trains with the projector (tests/test_bare_parameters.py), and the table says so
    assert support.support(families.get("llava_next"))["projector full"] == "yes (incl. model.image_newline)"


def test_gemma3_projector_lora_says_use_full_and_full_trains_the_bare_weight(tiny_model):
    from vlmtune.adapters.targets import TargetError, plan_targets

    family = families.get("gemma3")
    model = AutoModelForImageTextToText.from_pretrained(tiny_model("gemma3"), dtype=torch.float32)
    with pytest.raises(TargetError, match=r"gemma3's projector has no Linear layer .* use projector: full"):
        plan_targets(model, family, "language", projector="lora")
    plan = plan_targets(model, family, "language", projector="full")
    assert plan.full_modules == ["model.multi_modal_projector"]
    assert (
        plan.full_params["projector"] >= model.model.multi_modal_projector.mm_input_projection_weight.numel()
    )
