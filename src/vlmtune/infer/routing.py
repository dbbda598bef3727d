"""Per-row adapters for any forward pass, and the one batch loop that regroups a batch PEFT cannot route.

`route(registry, adapters)` sets PEFT up for a batch whose rows use `adapters` (one name per row): the
base alone, one adapter, or a mix. For a mix, plain LoRA Linear layers get their deltas from
`mixed.LinearStack` (two matmuls per layer for any number of adapters) while PEFT runs their base layer;
other layers (embedding LoRA, modules_to_save) use PEFT's layer-level mixed-batch forward, fed the
`adapter_names` keyword by us rather than through `generate(adapter_names=...)`: PEFT's modules_to_save
wrapper raises for a row whose adapter lacks that module, and we name such rows `__base__` there, which is
what they mean. Every layer a batch adapter changes first checks that it sees one input per row; a layer fed
image patches or tiles raises `RowMismatch`, the adapters that change it are marked not mixable, and
`run_batches` replans the batch (those adapters now run grouped) rather than mis-routing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import mixed
from .registry import AdapterRegistry, peft_name
from .types import BASE, InferenceError

Plan = Callable[[Sequence[int], int], list[list[int]]]


class RowMismatch(Exception):
    """Raised inside a mixed-batch forward when a LoRA layer sees inputs whose first dimension is not the
    batch of rows (image patches, tiles): per-row routing would be wrong there, so the batch is regrouped."""

    def __init__(self, module: str, rows: int, got: int) -> None:
        super().__init__(f"{module}: {got} inputs for {rows} rows")
        self.module = module


@contextlib.contextmanager
def route(registry: AdapterRegistry, adapters: Sequence[str]) -> Iterator[None]:
    """Route each row of every forward inside the block through its adapter (loaded names or BASE, one per
    row of the batch). A `RowMismatch` leaving the block has already marked the adapters concerned as not
    mixable, so replanning the rows (`Engine.plan`) groups them apart. Bare parameters hold one value per
    forward: a lone adapter's own inside the block, the base's otherwise (and again after it)."""
    distinct = list(dict.fromkeys(adapters))
    registry.require(distinct)
    registry.use_bare(distinct[0] if len(distinct) == 1 else BASE)
    try:
        with _route_rows(registry, distinct, adapters):
            yield
    finally:
        registry.use_bare(BASE)


@contextlib.contextmanager
def _route_rows(registry: AdapterRegistry, distinct: list[str], adapters: Sequence[str]) -> Iterator[None]:
    if distinct == [BASE]:
        with registry.peft.disable_adapter() if registry.peft is not None else contextlib.nullcontext():
            yield
        return
    if len(distinct) == 1:
        registry.activate(distinct[0])
        yield
        return
    handles = row_hooks(registry, adapters)
    try:
        yield
    except RowMismatch as exc:
        if not registry.demote(exc.module, set(distinct)):
            raise InferenceError(
                f"a mixed batch cannot be routed per row ({exc}), and regrouping would not help."
            ) from exc
        raise
    finally:
        for handle in handles:
            handle.remove()


def row_hooks(registry: AdapterRegistry, row_adapters: Sequence[str]) -> list[Any]:
    """Forward hooks routing each row through its adapter (one name per row); layers no batch adapter
    touches run their base path (the active adapter, one of the batch's, is absent there)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    rows = len(row_adapters)
    registry.activate(next(a for a in row_adapters if a != BASE))
    adapters = [peft_name(a) for a in row_adapters]
    named = [a for a in dict.fromkeys(adapters) if a != BASE]
    base_only = [BASE] * rows
    handles: list[Any] = bare_guard(registry, row_adapters)
    for name, module in registry.peft.base_model.model.named_modules():
        stack = None
        if isinstance(module, LoraLayer):
            present = (set(module.lora_A) | set(module.lora_embedding_A)) & set(named)
            if present and mixed.plain_linear(module, present):
                stack = mixed.LinearStack(module, adapters, present)
        elif isinstance(module, ModulesToSaveWrapper):
            present = set(module.modules_to_save) & set(named)
        else:
            continue
        if not present:
            continue
        names = base_only if stack is not None else [a if a in present else BASE for a in adapters]

        def check_rows(
            mod: Any, args: tuple, kwargs: dict, name: str = name, names: list[str] = names
        ) -> tuple[tuple, dict]:
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[0] != rows:
                raise RowMismatch(name, rows, x.shape[0])
            return args, {**kwargs, "adapter_names": names}

        handles.append(module.register_forward_pre_hook(check_rows, with_kwargs=True))
        if stack is not None:

            def add_delta(
                mod: Any, args: tuple, kwargs: dict, output: Any, stack: mixed.LinearStack = stack
            ) -> Any:
                x = args[0] if args else next(iter(kwargs.values()))
                return (output + stack.delta(x)).to(output.dtype)  # PEFT adds in the wider dtype

            handles.append(module.register_forward_hook(add_delta, with_kwargs=True))
    return handles


def bare_guard(registry: AdapterRegistry, row_adapters: Sequence[str]) -> list[Any]:
    """A mixed forward runs with the base's bare parameter values (`route`). That is exact for steps
    that build no image features (decode steps, text rows); a mixed forward that builds them for rows of an
    adapter with its own values (planned apart, see `adapter_checks.mixability`) would be silently wrong, so
    it raises instead."""
    owners = {param.rsplit(".", 1)[0]: name for name in set(row_adapters) for param in registry.bare_of(name)}

    def check(mod: Any, args: tuple, kwargs: dict, owner: str = "") -> None:
        if any(k.startswith("pixel_values") and v is not None for k, v in kwargs.items()):
            raise InferenceError(
                f"adapter {owners[owner]!r} replaces a bare parameter of {owner} that image features use, "
                "so its rows cannot share a forward with other adapters' rows; plan() the rows."
            )

    return [
        registry.base_model.get_submodule(owner).register_forward_pre_hook(
            lambda m, a, k, owner=owner: check(m, a, k, owner), with_kwargs=True
        )
        for owner in owners
    ]


def run_batches(
    plan: Plan, indices: Sequence[int], batch_size: int, step: Callable[[list[int]], None]
) -> None:
    """Run `step` on every batch `plan(indices, batch_size)` makes; a batch whose forward raised
    `RowMismatch` (its adapters now marked not mixable) is replanned in place and its parts run next.
    The one loop behind `generate` and `logits`."""
    pending = plan(indices, batch_size)
    while pending:
        batch = pending.pop(0)
        try:
            step(batch)
        except RowMismatch:
            pending[:0] = plan(batch, len(batch))
