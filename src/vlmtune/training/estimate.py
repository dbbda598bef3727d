"""`vlmtune train CONFIG --estimate [--nproc N]`: the memory one rank of the run will need, before the run.

Nothing is trained, written or read from the weights: the model is built on the meta device, the trainable
set is the one training resolves (`recipe.make_plan`), and the batch is the run's longest per-device batch
collated from the real data (so sequence length, image tokens under the configured pixel limits and the
supervised positions are the run's own). The figures are sums of counted tensors:

- frozen parameters at their storage size (precision, or bitsandbytes' 4-bit/8-bit storage plus its quant
  state; PEFT's k-bit preparation keeps the other frozen parameters in fp32);
- trainable parameters, their gradients and AdamW's two moments, all fp32 (the Trainer's default optimizer;
  the config has no optimizer key);
- activations per block of the family's `block_lists`, per token: three tensors the size of every Linear
  output (the output, what the next op makes of it, the temporary freed after it: on CPU freed temporaries
  stay in the process between the tensors autograd keeps), eight of the block's width (a pre-norm block's
  two norms of three tensors each and two residual sums) and, with LoRA dropout, each LoRA layer's dropped
  input and mask; a checkpointed block keeps only its input and one block is recomputed at a time;
  plus the supervised positions' vocabulary logits (fp32 for the loss, and their gradient);
- on CPU, the runtime: this process's own resident memory, measured after importing what training imports
  and reading the data (the Python, torch and transformers runtime dominates a small model's peak).

Sharding per rank: ddp replicates everything (plus DDP's gradient buckets); fsdp2 and zero3 shard parameters,
gradients and optimizer state over the world size and hold one block plus the unwrapped root unsharded while
computing; zero2 shards gradients and optimizer state only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoint, families
from ..config import ConfigError, TrainConfig, load_train_config
from . import distributed

# Files a processor is made of (no weights: an estimate of a hub model downloads only these).
PROCESSOR_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
FP32 = 4


@dataclass
class Parts:
    """Unsharded sizes in bytes, as one process holds them in a single-process run."""

    frozen: dict[str, int]  # storage kind (e.g. "bf16", "4bit nf4 + quant state") -> bytes
    trainable: int
    activations: int
    logits: int
    block: int  # the largest sharding unit (one family block), at storage size
    root: int  # parameters outside every block (embeddings, head, norms): FSDP2's root unit


@dataclass
class MemoryEstimate:
    """Expected memory per rank, in bytes (`total` is what to compare with a measured peak)."""

    strategy: str
    world_size: int
    device: str  # cpu | cuda
    precision: str
    quantization: str | None
    frozen: dict[str, int]
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    gathered: int  # unsharded while computing (fsdp2 / zero3)
    buckets: int  # DDP's gradient buckets (several processes)
    runtime: int  # measured resident memory of the runtime (CPU only; 0 on a GPU)
    rows: int  # batch rows per device
    sequence: int  # padded tokens per row of the longest batch
    vision_tokens: int  # vision-encoder tokens of that batch
    supervised: int  # positions with a loss in that batch
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (
            sum(self.frozen.values())
            + self.trainable
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.gathered
            + self.buckets
            + self.runtime
        )

    def lines(self) -> list[tuple[str, int, str]]:
        """(what, bytes, how) rows of the table, in the order they are shown."""
        params = "sharded" if self.strategy in ("fsdp2", "zero3") else "replicated"
        states = "sharded" if self.strategy != "ddp" else "replicated"
        batch = f"{self.rows} rows x {self.sequence} tokens, {self.vision_tokens} vision tokens"
        out = [(f"frozen parameters ({kind})", size, params) for kind, size in self.frozen.items()]
        out += [
            ("trainable parameters (fp32)", self.trainable, params),
            ("gradients (fp32)", self.gradients, states),
            ("optimizer state (AdamW, 2 x fp32)", self.optimizer, states),
            ("activations", self.activations, batch),
            ("logits for the loss (fp32)", self.logits, f"{self.supervised} supervised positions"),
        ]
        if self.gathered:
            out.append(("unsharded while computing", self.gathered, "one block + the root unit"))
        if self.buckets:
            out.append(("DDP gradient buckets", self.buckets, "a flat copy of the gradients"))
        if self.device == "cpu":
            out.append(
                ("runtime (measured)", self.runtime, "this process: Python, torch, transformers, data")
            )
        return out

    def render(self) -> str:
        from io import StringIO

        from rich.console import Console
        from rich.table import Table

        where = "GPU" if self.device == "cuda" else "CPU (resident memory)"
        table = Table(
            title=f"memory per rank: {self.strategy} x {self.world_size}, {self.precision}"
            + (f", {self.quantization}" if self.quantization else "")
            + f", on {where}"
        )
        table.add_column("what")
        table.add_column("MiB", justify="right")
        table.add_column("how")
        for what, size, how in self.lines():
            table.add_row(what, f"{size / 2**20:,.1f}", how)
        table.add_row("total", f"{self.total / 2**20:,.1f}", "per rank", style="bold")
        buffer = StringIO()
        Console(file=buffer, width=110, force_terminal=False).print(table)
        return buffer.getvalue().rstrip() + "".join(f"\n{note}" for note in self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def per_rank(parts: Parts, strategy: str, world_size: int) -> dict[str, Any]:
    """The sharding arithmetic: what one of `world_size` ranks holds of `parts` under `strategy`."""
    n = max(1, world_size)
    shard_params = strategy in ("fsdp2", "zero3") and n > 1
    shard_states = strategy != "ddp" and n > 1
    params = n if shard_params else 1
    states = n if shard_states else 1
    return {
        "frozen": {kind: -(-size // params) for kind, size in parts.frozen.items()},
        "trainable": -(-parts.trainable // params),
        "gradients": -(-parts.trainable // states),
        "optimizer": -(-2 * parts.trainable // states),
        "activations": parts.activations,
        "logits": parts.logits,
        "gathered": parts.block + parts.root if shard_params else 0,
        "buckets": parts.trainable if strategy == "ddp" and n > 1 else 0,
    }


def estimate(
    config: TrainConfig | str | Path | dict[str, Any],
    overrides: Sequence[str] = (),
    nproc: int | None = None,
    gpu: bool | None = None,
) -> MemoryEstimate:
    """Estimate one rank's memory for `config` on `nproc` processes (default: this launch's world), on this
    machine's device, or on CUDA GPUs when `gpu` (a GPU run planned from a machine without one: ZeRO too)."""
    from ..modeling import meta_model
    from .arguments import pick_precision
    from .recipe import image_limits, load_processor, make_plan, prepare_data

    cfg = load_train_config(config, overrides)
    world = distributed.World(nproc) if nproc is not None else distributed.world()
    if world.size < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {world.size}).")
    folder = checkpoint.resolve(cfg.model, allow_patterns=PROCESSOR_FILES)
    base_config = checkpoint.read_config(folder)
    family = families.detect(base_config)
    precision = pick_precision(cfg.precision, cuda=gpu)
    # Planning only: the packages a GPU run needs (deepspeed) need not be installed here.
    distributed.preflight(cfg, world, not precision.on_cpu, family, installed=not gpu)
    processor = load_processor(folder, image_limits(cfg, family))
    train, _ = prepare_data(cfg, processor, family, world)
    model = meta_model(base_config)
    plan = make_plan(model, family, cfg)
    batch = longest_batch(cfg, processor, family, train, distributed.per_device_batch(cfg, world))

    quantized = quantized_linears(model, family) if cfg.quantization else set()
    frozen = frozen_bytes(model, quantized, cfg.quantization, precision.dtype.itemsize, plan.bare_parameters)
    trainable = plan.trainable_params * FP32
    vision = vision_tokens(model.config, batch)
    acts = block_activations(model, family, cfg, plan, batch["tokens"], vision, precision.dtype.itemsize)
    vocab = model.get_output_embeddings().out_features
    # lm_head's rows in the compute dtype, their fp32 copy for the loss, log-softmax kept for backward, its gradient
    logits = batch["supervised"] * vocab * (precision.dtype.itemsize + 3 * FP32)
    block, root = unit_bytes(model, family, quantized, cfg.quantization, precision.dtype.itemsize)
    parts = Parts(frozen, trainable, acts, logits, block, root)
    figures = per_rank(parts, cfg.distributed, world.size)
    notes = []
    runtime = 0
    if precision.on_cpu:
        runtime = runtime_rss()
    else:
        notes.append("GPU figures exclude the CUDA context and allocator reserve; not yet checked on a GPU.")
    return MemoryEstimate(
        strategy=cfg.distributed,
        world_size=world.size,
        device="cpu" if precision.on_cpu else "cuda",
        precision=precision.name,
        quantization=cfg.quantization,
        runtime=runtime,
        rows=batch["rows"],
        sequence=batch["sequence"],
        vision_tokens=vision,
        supervised=batch["supervised"],
        notes=notes,
        **figures,
    )


# -- the pieces ---------------------------------------------------------------------------------------------


def longest_batch(
    cfg: TrainConfig, processor: Any, family: families.Family, report: Any, rows: int
) -> dict[str, Any]:
    """The per-device batch of the longest rows, collated as training collates it (padded: an upper bound
    for packed batches of the same rows). With `max_tokens_per_batch`, as many longest rows as the budget holds."""
    from ..data.collate import SampleDataset
    from .batches import make_collator

    samples = sorted(report.samples, key=lambda s: report.lengths.get(s.where, 0), reverse=True)
    if cfg.max_tokens_per_batch and samples:
        longest = min(report.lengths.get(samples[0].where, 1), cfg.max_length or float("inf"))
        rows = max(1, cfg.max_tokens_per_batch // max(1, int(longest)))
    dataset = SampleDataset(samples[: max(1, rows)])
    collated = make_collator(cfg, processor, family, None, packed=False)(
        [dataset[i] for i in range(len(dataset))]
    )
    ids = collated["input_ids"]
    keep = collated.get("logits_to_keep")
    return {
        "rows": int(ids.shape[0]),
        "sequence": int(ids.shape[-1]),
        "tokens": int(ids.numel()),
        "supervised": int(keep.sum()) if keep is not None else int(ids.numel()),
        "pixel_values": collated.get("pixel_values"),
    }


def vision_tokens(config: Any, batch: dict[str, Any]) -> int:
    """Tokens the vision encoder sees: the pixel values divided into patches of its config's size."""
    pixels = batch.get("pixel_values")
    vision = getattr(config, "vision_config", None)
    patch = getattr(vision, "patch_size", None)
    if pixels is None or not patch:
        return 0
    area = patch[0] * patch[1] if isinstance(patch, (list, tuple)) else patch * patch
    channels = getattr(vision, "num_channels", None) or getattr(vision, "in_channels", None) or 3
    temporal = getattr(vision, "temporal_patch_size", None) or 1
    return int(pixels.numel()) // (channels * area * temporal)


def quantized_linears(model: Any, family: families.Family) -> set[str]:
    """The Linear layers bitsandbytes quantizes: every one outside the kept-unquantized prefixes."""
    import torch

    from ..infer.quant import skip_modules

    skip = skip_modules(family)
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not any(name == p or name.startswith(p + ".") for p in skip)
    }


def quantized_size(numel: int, rows: int, mode: str) -> int:
    """bitsandbytes storage of one weight: NF4 (two per byte) with double-quantized absmax (one byte per block
    of 64, fp32 per 256 blocks), or int8 with one fp32 scale per output row."""
    if mode == "4bit":
        blocks = -(-numel // 64)
        return numel // 2 + blocks + -(-blocks // 256) * FP32
    return numel + rows * FP32


def storage_bytes(
    name: str, numel: int, rows: int, quantized: set[str], mode: str | None, itemsize: int
) -> tuple[str, int]:
    """(storage kind, bytes) of one base parameter; PEFT's k-bit preparation upcasts the unquantized ones."""
    module, _, leaf = name.rpartition(".")
    if module in quantized and leaf == "weight":
        kind = "4bit nf4 + quant state" if mode == "4bit" else "int8 + scales"
        return kind, quantized_size(numel, rows, str(mode))
    if mode:
        return "fp32", numel * FP32
    return {4: "fp32", 2: "bf16/fp16"}.get(itemsize, f"{itemsize}-byte"), numel * itemsize


def frozen_bytes(
    model: Any, quantized: set[str], mode: str | None, itemsize: int, trained: Sequence[str] = ()
) -> dict[str, int]:
    """The base's parameters by storage kind; `trained`: bare parameters trained in place (counted as
    trainable; a `modules_to_save` module keeps its frozen original beside the trained copy, so it stays)."""
    kinds: dict[str, int] = {}
    for name, param in model.named_parameters():
        if name in trained:
            continue
        kind, size = storage_bytes(name, param.numel(), param.shape[0], quantized, mode, itemsize)
        kinds[kind] = kinds.get(kind, 0) + size
    return kinds


def unit_bytes(
    model: Any, family: families.Family, quantized: set[str], mode: str | None, itemsize: int
) -> tuple[int, int]:
    """(the largest block, everything outside the blocks) at storage size: what FSDP2 / ZeRO-3 gather while
    computing (one block at a time, and the root unit for the whole step)."""
    blocks: dict[str, int] = {}
    root = 0
    prefixes = [path + "." for path in family.block_lists]
    for name, param in model.named_parameters():
        size = storage_bytes(name, param.numel(), param.shape[0], quantized, mode, itemsize)[1]
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            root += size
        else:
            block = prefix + name[len(prefix) :].split(".", 1)[0]
            blocks[block] = blocks.get(block, 0) + size
    return max(blocks.values(), default=0), root


def block_activations(
    model: Any, family: families.Family, cfg: TrainConfig, plan: Any, tokens: int, vision: int, itemsize: int
) -> int:
    """Activation bytes of the batch, block by block over the family's `block_lists`."""
    import torch

    lora = set(plan.lora_modules)
    trained_roles = set(plan.lora_roles) | set(plan.full_roles)
    dropout = cfg.lora.dropout > 0
    total, recompute = 0, 0
    for path in family.block_lists:
        role = family.role_of(path + ".0") or "language"
        if role == "vision" and "vision" not in trained_roles:
            continue  # nothing trains in or before a frozen vision tower: autograd keeps nothing there
        count = tokens if role != "vision" else vision
        checkpointed = cfg.gradient_checkpointing is True or cfg.gradient_checkpointing == role
        for block_name, block in model.get_submodule(path).named_children():
            linears = [
                (f"{path}.{block_name}.{n}", m)
                for n, m in block.named_modules()
                if isinstance(m, torch.nn.Linear)
            ]
            if not linears:
                continue
            outputs = sum(m.out_features for _, m in linears)
            dropped = sum(m.in_features for n, m in linears if n in lora) if dropout else 0
            width = linears[0][1].in_features
            # Per token: three tensors per Linear output, eight of the block's width (two norms of three
            # tensors, two residual sums), and each LoRA layer's dropped input (compute dtype) with its mask.
            full = count * ((3 * outputs + 8 * width) * itemsize + dropped * (itemsize + 1))
            total += count * width * itemsize if checkpointed else full
            if checkpointed:
                recompute = max(recompute, full)
    return total + recompute


def runtime_rss() -> int:
    """Resident memory of this process after importing what a training process imports (the Trainer, PEFT,
    accelerate, the loss plot): a measured baseline of this machine, not a modelled one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # the run's loss plot
    import peft  # noqa: F401
    import psutil
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    from . import callbacks, trainer  # noqa: F401

    return int(psutil.Process().memory_info().rss)
