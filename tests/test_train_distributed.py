"""Distributed training, the fast part (no second process): the family's blocks, the strategy's Trainer
arguments, the preflight refusals, the every-rank image row and the save integrity check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmtune import families, tiny


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_every_family_names_its_blocks(name):
    family = families.get(name)
    model, _ = tiny.build(name, "tiny", 0, None, False)
    assert family.block_lists, f"{name} declares no block_lists (FSDP2 would have nothing to shard)"
    for path in family.block_lists:
        blocks = model.get_submodule(path)
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0, path
    # No stack of blocks is forgotten (an unlisted one would sit in the root unit, gathered whole).
    stacks = {n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1}
    assert stacks <= set(family.block_lists)


def cfg(**overrides):
    from vlmtune.config import load_train_config

    base = {"model": "m", "output_dir": "o", "data": {"train": "t.jsonl"}}
    return load_train_config(base, [f"{k}={v}" for k, v in overrides.items()])


QWEN = families.get("qwen2_vl")


@pytest.mark.parametrize(
    ("settings", "world", "cuda", "message"),
    [
        ({"distributed": "fsdp2"}, 1, False, "this is one process"),
        (
            {"distributed": "zero3", "batch_size": 2},
            2,
            False,
            "needs CUDA GPUs; on CPU accelerate would quietly run DDP",
        ),
        (
            {"distributed": "fsdp2", "gradient_checkpointing": "language", "batch_size": 2},
            2,
            False,
            "clashes with distributed: fsdp2",
        ),
        (
            {"distributed": "fsdp2", "quantization": "8bit", "batch_size": 2},
            2,
            False,
            "8bit cannot be sharded",
        ),
        (
            {"distributed": "fsdp2", "lora.dora": "true", "batch_size": 2},
            2,
            False,
            "DoRA reads the LoRA factors' weights outside",
        ),
        ({"batch_size": 3}, 2, False, "must divide evenly over 2 processes"),
        ({"deepspeed": "ds.json"}, 2, False, "set distributed: zero2 or zero3"),
        (
            {"group_by_length": "true", "packing": "off", "batch_size": 2},
            2,
            False,
            "plan batches within one process",
        ),
    ],
)
def test_preflight_refuses_what_would_not_run_as_asked(settings, world, cuda, message):
    from vlmtune.config import ConfigError
    from vlmtune.training.distributed import World, preflight

    with pytest.raises(ConfigError, match=message):
        preflight(cfg(**settings), World(world, 0), cuda, QWEN)
    preflight(cfg(batch_size=2), World(2, 1), False, QWEN)  # a plain DDP setup passes


def test_fsdp2_arguments_wrap_the_family_blocks_and_presets_are_deepspeed_configs():
    import json

    from vlmtune.training.distributed import preset, strategy_arguments

    model, _ = tiny.build("qwen2_vl", "tiny", 0, None, False)
    fsdp = strategy_arguments(cfg(distributed="fsdp2", gradient_checkpointing="true"), model, QWEN)
    assert fsdp["fsdp"] == "full_shard" and fsdp["fsdp_config"]["version"] == 2
    assert fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"] == [
        "Qwen2VLDecoderLayer",
        "Qwen2VLVisionBlock",
    ]
    assert fsdp["fsdp_config"]["activation_checkpointing"] is True
    assert strategy_arguments(cfg(), model, QWEN) == {"ddp_find_unused_parameters": False}
    for stage in (2, 3):
        args = strategy_arguments(cfg(distributed=f"zero{stage}"), model, QWEN)
        assert json.loads(Path(args["deepspeed"]).read_text())["zero_optimization"]["stage"] == stage
    assert (
        strategy_arguments(cfg(distributed="zero2", deepspeed="mine.json"), model, QWEN)["deepspeed"]
        == "mine.json"
    )
    assert preset("zero3").is_file()


def test_the_every_rank_image_row_adds_no_loss(tiny_model, tmp_path):
    from transformers import AutoProcessor

    from vlmtune.conversation import Conversation, Message, Part
    from vlmtune.data.collate import IGNORE_INDEX, Collator, Item
    from vlmtune.data.formats import Sample
    from vlmtune.training.batches import REAL_IMAGES, ImageInEveryBatch

    processor = AutoProcessor.from_pretrained(tiny_model("qwen2_vl"))
    text = Sample(
        Conversation((Message("user", (Part("text", "hi"),)), Message("assistant", (Part("text", "yo"),)))),
        "t",
    )
    collator = Collator(processor, supervised_logits_only=True)
    alone = collator([Item(0, 0, text)])
    batch = ImageInEveryBatch(collator, packed=False)([Item(0, 0, text)])
    assert "pixel_values" in batch and batch[REAL_IMAGES].item() == 0 and batch["input_ids"].shape[0] == 2
    assert (batch["labels"][-1] == IGNORE_INDEX).all() and not batch["logits_to_keep"][-1].any()
    real = alone["labels"][alone["labels"] != IGNORE_INDEX]
    assert torch.equal(batch["labels"][batch["labels"] != IGNORE_INDEX], real)
    assert int(batch["logits_to_keep"].sum()) == int(alone["logits_to_keep"].sum())


def test_the_integrity_check_compares_what_was_written_with_the_live_parameters(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    from vlmtune.errors import VlmtuneError
    from vlmtune.training.integrity import check_saved, gather_adapter

    model = AutoModelForImageTextToText.from_pretrained(tiny_model("qwen2_vl"))
    peft = get_peft_model(
        model, LoraConfig(r=2, target_modules=QWEN.default_target_regex, init_lora_weights=False)
    )
    peft.save_pretrained(tmp_path / "a", state_dict=gather_adapter(peft))
    check_saved(peft, tmp_path / "a")  # equal: passes
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(VlmtuneError, match=r"save integrity check failed.*differs from the live parameter"):
        check_saved(peft, tmp_path / "a")
    tensors.pop(key)
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(VlmtuneError, match="is missing"):
        check_saved(peft, tmp_path / "a")


def test_the_integrity_check_reads_the_fsdp_resume_file_too(tiny_model, tmp_path):
    """Under FSDP a resume restores the trained weights from the Trainer's `pytorch_model_fsdp.bin`, not
    from the adapter file: a slice missing there (rank 0's half only, accelerate PR #4206) fails the save."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlmtune.errors import VlmtuneError
    from vlmtune.training.integrity import FSDP_WEIGHTS, check_saved, gather_adapter

    model = AutoModelForImageTextToText.from_pretrained(tiny_model("qwen2_vl"))
    peft = get_peft_model(
        model, LoraConfig(r=2, target_modules=QWEN.default_target_regex, init_lora_weights=False)
    )
    peft.save_pretrained(tmp_path / "a", state_dict=gather_adapter(peft))
    full = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    torch.save(full, tmp_path / "a" / FSDP_WEIGHTS)
    check_saved(peft, tmp_path / "a")  # equal: passes
    key = next(k for k in full if "lora_B" in k)
    full[key] = torch.cat([full[key].chunk(2)[0], torch.zeros_like(full[key].chunk(2)[1])])
    torch.save(full, tmp_path / "a" / FSDP_WEIGHTS)
    with pytest.raises(VlmtuneError, match=rf"{FSDP_WEIGHTS}: .*lora_B.*differs from the live parameter"):
        check_saved(peft, tmp_path / "a")
