"""Every save counts only after it is re-read and compared with the live parameters.

The written adapter file (and under FSDP the file a resume restores from, `pytorch_model_fsdp.bin`) is read
back on every process and each trainable parameter is compared with it: under FSDP2 each rank checks its own
shard (the slice of the written tensor that `torch.chunk` gives its mesh position, as FSDP2 shards dim 0),
so a gather that kept only rank 0's slice, wrote zeros for the rest (ZeRO-3's empty adapters, accelerate PR
#4206) or mixed ranks up fails here, on every rank at once. Names go through PEFT's own
`get_peft_model_state_dict` (plus the bare parameters, `adapters.save.adapter_state`), the mapping the save
used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError
from ..io import DamagedFileError, read_file

WEIGHTS = "adapter_model.safetensors"
# What an FSDP resume restores the trained weights from (accelerate's `save_fsdp_model`, full state dict of the
# trainable parameters, written by the Trainer next to the adapter): checked like the adapter file.
FSDP_WEIGHTS = "pytorch_model_fsdp.bin"
# FSDP2's activation checkpointing (torch's CheckpointWrapper around each block) inserts this into the runtime
# parameter names; state dicts drop it (torch's own hook), and so must every name we save or compare.
_CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."


@contextmanager
def plain_module_names(model: Any) -> Iterator[None]:
    """While active, the blocks FSDP2's activation checkpointing put into torch's CheckpointWrapper sit in
    their places unwrapped, so module and parameter names are the ones the adapter is saved under. PEFT picks
    an adapter's tensors by module name (`get_peft_model_state_dict`), and under the wrapper every name
    carries `_checkpoint_wrapped_module.`: the adapter was saved under keys no loader places. Only for a
    gather, save or check: no forward runs meanwhile, and the parameters themselves do not move."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, CheckpointWrapper)]
    for name, wrapper in wrapped:
        model.set_submodule(name, wrapper._checkpoint_wrapped_module)
    try:
        yield
    finally:
        for name, wrapper in wrapped:
            model.set_submodule(name, wrapper)


def trained_parameters(model: Any) -> list[tuple[str, Any]]:
    """(name as saved, parameter) for every trainable parameter of the live (possibly wrapped) model."""
    return [(n.replace(_CHECKPOINT_WRAPPER, ""), p) for n, p in model.named_parameters() if p.requires_grad]


def local_trainable(peft_model: Any) -> dict[str, Any]:
    """Saved key -> this process's part of the live tensor (a DTensor stays a DTensor: `compare` slices),
    bare parameters trained in full included (`adapters.save.adapter_state`)."""
    from ..adapters.save import adapter_state

    live = {name: p.detach() for name, p in trained_parameters(peft_model)}
    return adapter_state(peft_model, state_dict=live)


def mismatches(peft_model: Any, folder: Path) -> list[str]:
    """What differs between `folder`'s adapter file and the live trainable parameters (empty: all equal)."""
    problems: list[str] = []
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        return [f"{WEIGHTS} was not written"]
    try:
        written = read_file(path)  # the one reader: a header that does not add up is a problem too
    except DamagedFileError as exc:
        return [str(exc)]
    for key, live in local_trainable(peft_model).items():
        if key not in written:
            problems.append(f"{key} is missing")
            continue
        saved = written[key].torch()
        if saved.numel() == 0:
            problems.append(f"{key} is empty")
            continue
        problem = compare(key, live, saved)
        if problem:
            problems.append(problem)
    return problems + resume_mismatches(peft_model, folder)


def resume_mismatches(peft_model: Any, folder: Path) -> list[str]:
    """What differs between the FSDP resume file (if written) and the live trainable parameters."""
    path = Path(folder) / FSDP_WEIGHTS
    if not path.is_file():
        return []
    import torch

    # The Trainer's own torch.save file; weights_only loads tensors and never runs code.
    written = torch.load(path, map_location="cpu", weights_only=True)
    problems = []
    for name, param in trained_parameters(peft_model):
        saved = written.get(name)
        problem = f"{name} is missing" if saved is None else compare(name, param.detach(), saved)
        if problem:
            problems.append(f"{FSDP_WEIGHTS}: {problem}")
    return problems


def compare(key: str, live: Any, saved: Any) -> str | None:
    from torch.distributed.tensor import DTensor

    if isinstance(live, DTensor):
        if tuple(live.shape) != tuple(saved.shape):
            return f"{key} has shape {tuple(saved.shape)}, the live parameter {tuple(live.shape)}"
        local, expected = live.to_local(), saved
        for mesh_dim, placement in enumerate(live.placements):
            if placement.is_shard():
                pieces = saved.chunk(live.device_mesh.size(mesh_dim), dim=placement.dim)
                index = live.device_mesh.get_local_rank(mesh_dim)
                expected = pieces[index] if index < len(pieces) else saved.narrow(placement.dim, 0, 0)
    else:
        local, expected = live, saved
    local = local.to("cpu", expected.dtype)
    if tuple(local.shape) != tuple(expected.shape):
        return f"{key} has shape {tuple(expected.shape)} here, the live parameter {tuple(local.shape)}"
    if not bool((local == expected).all()):
        return f"{key} differs from the live parameter (max |diff| {(local.float() - expected.float()).abs().max():.3g})"
    return None


def check_saved(peft_model: Any, folder: Path) -> None:
    """Raise on every process when any process finds a difference (all processes must call this)."""
    with plain_module_names(peft_model):
        problems = mismatches(peft_model, folder)
    failed = _count_everywhere(len(problems))
    if failed:
        detail = "; ".join(problems[:3]) if problems else "another process found differences"
        raise VlmtuneError(
            f"save integrity check failed for {folder}: what was written is not the trained adapter ({detail}); "
            "it is not kept as a checkpoint. This is a bug in the gather of the distributed strategy; please report it."
        )


def _count_everywhere(n: int) -> int:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([n], device=device)
    dist.all_reduce(total)
    return int(total.item())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_adapter(peft_model: Any) -> dict[str, Any]:
    """Full CPU copies of the trainable parameters, on every process (a collective: all must call it).

    Our own because accelerate's `get_state_dict` gathers the whole model, frozen base included, onto rank 0
    (a 70B base in host memory to save megabytes of adapter), and on CPU it hands back views of FSDP2's
    freed unsharded storage; torch's `DTensor.full_tensor` (FSDP2) and DeepSpeed's `GatheredParameters`
    (ZeRO-3) gather only what the adapter holds."""
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    for name, param in trained_parameters(peft_model):
        if isinstance(param, DTensor):
            full = param.full_tensor()
        elif hasattr(param, "ds_id"):  # a ZeRO-3 partition
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                full = param.data.clone()
        else:
            full = param.data
        out[name] = full.detach().to("cpu", copy=True)
    return out


def save_checked(trainer: Any, processor: Any, manifest: Any, out: Path, main: bool) -> Path:
    """The final adapter: gathered as the checkpoints are (`gather_adapter`), written by rank 0 into a
    staging folder, re-read and checked on every process, and only then completed and renamed to `out`."""
    import os
    import shutil

    from ..adapters.save import add_bare, complete

    model = trainer.accelerator.unwrap_model(trainer.model)
    staging = out.with_name(f".{out.name}.staging")
    with plain_module_names(model):
        state = gather_adapter(model)
        if main:
            if staging.exists():
                shutil.rmtree(staging)
            model.save_pretrained(staging, state_dict=state)
            add_bare(model, staging, state)
    barrier()
    check_saved(model, staging)
    if main:
        complete(staging, processor, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    barrier()
    return out
