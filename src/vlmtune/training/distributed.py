"""Multi-process training: the launch world, the strategy's Trainer arguments, and the preflight refusals.

The strategies are the libraries' own: DDP and FSDP2 through transformers' Trainer and accelerate
(`fsdp2_prepare_model`), ZeRO-2/3 through DeepSpeed's config files. vlmtune only chooses what FSDP2 wraps:
each trained leaf (a LoRA factor, a `modules_to_save` copy: fp32) is a unit of its own, then each block the
family names (`Family.block_lists`: decoder layers, vision blocks; the frozen base, e.g. bf16), then
accelerate's embeddings/head and root units. So no FSDP2 unit mixes trained fp32 weights with the frozen
base (as LLaMA-Factory and torchtune shard LoRA), and `check_wrapped` asserts that before the first step
(run on CPU with a bf16 base in tests/test_train_multiprocess.py).

One exception, on CPU only: accelerate never selects FSDP for `MULTI_CPU` (its FSDP switch lists GPU-like
devices) and would run DDP instead without saying so. `enable_fsdp_on_cpu` flips exactly that switch after
the Accelerator is built (where accelerate records it itself, so checkpoint loading sees it too), so on CPU the same accelerate wrap, gather and save code runs as on GPUs, and
`check_wrapped` asserts the wrapper type before the first step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..config import ConfigError, TrainConfig
from ..families import Family

STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")


@dataclass(frozen=True)
class World:
    """The processes of this run, as torchrun / accelerate launch describe them in the environment."""

    size: int = 1
    rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    return World(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")))


def preflight(cfg: TrainConfig, world: World, cuda: bool, family: Family, *, installed: bool = True) -> None:
    """Refuse, before anything is loaded or written, a setup whose strategy would not run as asked
    (`installed=False`: planning a run elsewhere, the strategy's packages need not be installed here)."""
    strategy = cfg.distributed
    if cfg.deepspeed and strategy not in ("zero2", "zero3"):
        raise ConfigError(
            f"deepspeed: {cfg.deepspeed} is set but distributed is {strategy}; set distributed: zero2 or zero3."
        )
    if strategy != "ddp" and world.size == 1:
        raise ConfigError(
            f"distributed: {strategy} shards over several processes, but this is one process (it would run "
            "unsharded); launch with `vlmtune train CONFIG --nproc N`, torchrun or accelerate launch, or set "
            "distributed: ddp."
        )
    if strategy in ("zero2", "zero3"):
        if not cuda:
            raise ConfigError(
                f"distributed: {strategy} (DeepSpeed) needs CUDA GPUs; on CPU accelerate would quietly run DDP "
                "instead. Use distributed: ddp or fsdp2 here (to plan a GPU run from here: --estimate --gpu)."
            )
        import importlib.util

        if installed and importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"distributed: {strategy} needs the deepspeed package: pip install deepspeed.")
    if strategy == "fsdp2":
        if not family.block_lists:
            raise ConfigError(
                f"distributed: fsdp2: the {family.name} family declares no blocks to shard (block_lists)."
            )
        if cfg.gradient_checkpointing in ("language", "vision"):
            raise ConfigError(
                f"gradient_checkpointing: {cfg.gradient_checkpointing} clashes with distributed: fsdp2, whose "
                "activation checkpointing covers every sharded block (language and vision); set "
                "gradient_checkpointing: true or false."
            )
        if cfg.quantization == "8bit":
            raise ConfigError(
                "quantization: 8bit cannot be sharded by FSDP2 (int8 weights); use quantization: 4bit (stored as "
                "bf16 under FSDP2) or distributed: ddp."
            )
        if cfg.lora.dora:
            raise ConfigError(
                "lora.dora cannot be sharded by FSDP2 here: PEFT's DoRA reads the LoRA factors' weights outside "
                "their forward, so they cannot be FSDP units of their own; set lora.dora: false or distributed: ddp."
            )
    if cfg.batch_size % world.size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is the global batch per step and must divide evenly over {world.size} "
            f"processes; set batch_size to a multiple of {world.size}."
        )
    if world.size > 1 and (cfg.group_by_length or cfg.max_tokens_per_batch):
        raise ConfigError(
            "group_by_length and max_tokens_per_batch plan batches within one process; with several processes "
            "use batch_size (or train in one process)."
        )
    if world.size > 1 and not family.mixed_image_batches:
        return  # text-only rows are refused per batch by data.split for such families (see `dummy_row`)


def per_device_batch(cfg: TrainConfig, world: World) -> int:
    return cfg.batch_size // world.size


def block_classes(model: Any, family: Family) -> list[str]:
    """Class names of the family's blocks in this model (what FSDP2 wraps one by one)."""
    names: list[str] = []
    for path in family.block_lists:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            raise ConfigError(
                f"{family.name}: block list {path} is not in this model; this is a vlmtune bug."
            ) from None
        names += [type(b).__name__ for b in blocks.children()]
    return list(dict.fromkeys(names))


def strategy_arguments(cfg: TrainConfig, model: Any, family: Family) -> dict[str, Any]:
    """TrainingArguments for the strategy (on top of `training_arguments`'s)."""
    if cfg.distributed == "ddp":
        # Every trainable parameter gets a gradient on every rank by construction (see `dummy_row`), so DDP
        # need not search for unused ones; one that still gets none makes DDP fail loudly, never hang.
        return {"ddp_find_unused_parameters": False}
    if cfg.distributed == "fsdp2":
        return {
            "fsdp": "full_shard",
            "fsdp_config": {
                "version": 2,
                "transformer_layer_cls_to_wrap": block_classes(model, family),
                "reshard_after_forward": True,
                # Full state dicts on save: every checkpoint holds complete adapter files (gathered by
                # accelerate's get_state_dict) that `check_saved` re-reads against the live shards.
                "state_dict_type": "FULL_STATE_DICT",
                "activation_checkpointing": bool(cfg.gradient_checkpointing),
                "cpu_ram_efficient_loading": False,
            },
        }
    return {"deepspeed": cfg.deepspeed or str(preset(cfg.distributed))}


def preset(name: str) -> Any:
    """The shipped DeepSpeed config for zero2 / zero3 (`vlmtune/training/presets/<name>.json`)."""
    return resources.files(__package__) / "presets" / f"{name}.json"


def enable_fsdp_on_cpu(trainer: Any) -> None:
    """Make accelerate run its FSDP path on CPU (gloo), where it would silently fall back to DDP."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ConfigError(
            f"distributed: fsdp2 was asked for, but accelerate chose {state.distributed_type}; not training with "
            "a strategy other than the one requested."
        )
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # Where accelerate selects FSDP itself it records it in PartialState too (AcceleratorState.__init__), and
    # every later `AcceleratorState()` re-reads it from there: without this, a resume's load_fsdp_model saw
    # MULTI_CPU on rank 1 and skipped the broadcast rank 0 was in (a hang).
    from accelerate.state import PartialState

    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def trained_leaves(model: Any) -> list[Any]:
    """The modules that hold only trained weights and run their own forward: each LoRA factor (the entries
    of PEFT's `lora_A`/`lora_B`) and each `modules_to_save` copy. Under FSDP2 each is a unit of its own."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    leaves: list[Any] = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            leaves += [*module.lora_A.values(), *module.lora_B.values()]
        elif isinstance(module, ModulesToSaveWrapper):
            leaves += list(module.modules_to_save.values())
    return [m for m in leaves if any(p.requires_grad for p in m.parameters())]


@contextmanager
def trained_leaves_own_units() -> Iterator[None]:
    """While active, accelerate's FSDP2 wrap policy also picks the trained leaves.

    accelerate 1.15 builds its FSDP2 policy from class names (`transformer_layer_cls_to_wrap`) or sizes only
    (`fsdp2_prepare_auto_wrap_policy`; a lambda policy is ignored there), and a LoRA factor is a plain
    `nn.Linear`, the class of the frozen layer beside it, so no class name can select it. This extends the
    policy accelerate builds by those modules, in `fsdp2_prepare_model` only: the wrapping itself stays
    accelerate's (bottom-up `fully_shard` with its mixed-precision, reshard and mesh settings, so leaves before
    blocks), and its activation checkpointing (`fsdp2_apply_ac`, which reads the same policy before) still
    wraps blocks only."""
    from accelerate import accelerator as accelerate_module
    from accelerate.utils import fsdp_utils

    blocks_policy = fsdp_utils.fsdp2_prepare_auto_wrap_policy
    prepare = accelerate_module.fsdp2_prepare_model

    def policy(plugin: Any, model: Any) -> Any:
        blocks = blocks_policy(plugin, model)
        leaves = {id(m) for m in trained_leaves(model)}
        return lambda module: id(module) in leaves or bool(blocks is not None and blocks(module))

    def prepare_with_leaves(accelerator: Any, model: Any) -> Any:
        fsdp_utils.fsdp2_prepare_auto_wrap_policy = policy
        try:
            return prepare(accelerator, model)
        finally:
            fsdp_utils.fsdp2_prepare_auto_wrap_policy = blocks_policy

    accelerate_module.fsdp2_prepare_model = prepare_with_leaves
    try:
        yield
    finally:
        accelerate_module.fsdp2_prepare_model = prepare


def unit_parameters(model: Any) -> dict[str, list[tuple[str, Any]]]:
    """FSDP2 unit (module path, "" for the root) -> the (name, parameter) pairs it manages: those below it
    and not below a nested unit (a parameter shared by two modules counts once, where it is first seen)."""
    from torch.distributed.fsdp import FSDPModule

    units: dict[str, list[tuple[str, Any]]] = {}
    seen: set[int] = set()

    def walk(module: Any, path: str, unit: str | None) -> None:
        if isinstance(module, FSDPModule):
            unit = path
            units.setdefault(unit, [])
        for name, param in module.named_parameters(recurse=False):
            if unit is not None and id(param) not in seen:
                seen.add(id(param))
                units[unit].append((f"{path}.{name}" if path else name, param))
        for name, child in module.named_children():
            walk(child, f"{path}.{name}" if path else name, unit)

    walk(model, "", None)
    return units


def unit_problems(model: Any) -> list[str]:
    """Why the FSDP2 wrap is not as intended: a trained leaf that is no unit of its own, a unit that mixes
    trained leaves' weights with frozen parameters, or trained parameters of several dtypes in one unit
    (empty: fine). A bare trained parameter (LLaVA-NeXT's `image_newline`: no module of its own, its owner is
    the whole model) can only sit in its owner's unit beside frozen ones; FSDP2 needs a uniform dtype only
    among a unit's trained parameters, which is still checked."""
    from torch.distributed.fsdp import FSDPModule

    path = {id(m): name for name, m in model.named_modules()}
    leaves = trained_leaves(model)
    problems = [
        f"{path[id(m)]} ({type(m).__name__}) holds trained weights but is no FSDP unit of its own"
        for m in leaves
        if not isinstance(m, FSDPModule)
    ]
    in_leaves = {id(p) for m in leaves for p in m.parameters()}
    for unit, params in unit_parameters(model).items():
        trained = [(n, p) for n, p in params if p.requires_grad]
        frozen = [(n, p) for n, p in params if not p.requires_grad]
        of_leaves = [(n, p) for n, p in trained if id(p) in in_leaves]
        where = unit or "the root"
        if of_leaves and frozen:
            problems.append(
                f"FSDP unit {where} mixes trained ({of_leaves[0][0]}, {of_leaves[0][1].dtype}) and frozen "
                f"({frozen[0][0]}, {frozen[0][1].dtype}) parameters"
            )
        dtypes = sorted({str(p.dtype) for _, p in trained})
        if len(dtypes) > 1:
            problems.append(
                f"FSDP unit {where} holds trained parameters of several dtypes ({', '.join(dtypes)})"
            )
    return problems


def check_wrapped(model: Any, strategy: str) -> None:
    """The model the Trainer trains is wrapped as `strategy` says (never assume the library did it)."""
    if strategy == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if not isinstance(model, FSDPModule) or len(units) < 2:
            raise RuntimeError(
                f"distributed: fsdp2 asked for, but the model is {type(model).__name__} ({len(units)} FSDP units)."
            )
        problems = unit_problems(model)
        if problems:
            raise RuntimeError(f"distributed: fsdp2 wrapped the model wrongly: {'; '.join(problems[:3])}.")
    elif strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            raise RuntimeError(
                f"distributed: ddp over several processes, but the model is {type(model).__name__}."
            )
