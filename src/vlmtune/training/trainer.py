"""The Trainer subclass: only what `transformers.Trainer` cannot be configured to do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import Trainer


class VlmTrainer(Trainer):
    """`Trainer` with extra learning-rate groups (e.g. `projector_lr`): the default optimizer is built, then
    each group's parameters move into a copy of their group with its own lr. Weight decay grouping, the
    scheduler (which scales every group's lr) and checkpointing stay the Trainer's."""

    def __init__(self, *args: Any, group_lrs: Sequence[tuple[list[Any], float]] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group_lrs = list(group_lrs)

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is not None or not self.group_lrs:
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        groups = []
        for group in optimizer.param_groups:
            rest = list(group["params"])
            settings = {k: v for k, v in group.items() if k != "params"}
            for params, lr in self.group_lrs:
                ids = {id(p) for p in params}
                chosen = [p for p in rest if id(p) in ids]
                rest = [p for p in rest if id(p) not in ids]
                if chosen:
                    groups.append({**settings, "params": chosen, "lr": lr})
            if rest:
                groups.append({**settings, "params": rest})
        # Regroup in place (the optimizer has no state yet), keeping its class and construction options.
        optimizer.param_groups = []
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer
