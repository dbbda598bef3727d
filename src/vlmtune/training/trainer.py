"""The Trainer subclass: only what `transformers.Trainer` cannot be configured to do."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from transformers import Trainer


class VlmTrainer(Trainer):
    """`Trainer` with extra learning-rate groups (e.g. `projector_lr`): the default optimizer is built, then
    each group's parameters move into a copy of their group with its own lr. Weight decay grouping, the
    scheduler (which scales every group's lr) and checkpointing stay the Trainer's.

    Every step log also gets the interval's real (non-padding) tokens/s and padding ratio, so metrics.jsonl
    and the progress line show what padding costs (packed batches: 0)."""

    def __init__(self, *args: Any, group_lrs: Sequence[tuple[list[Any], float]] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group_lrs = list(group_lrs)
        self.interval = TokenInterval()

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        self.interval.add(inputs, self.state.num_input_tokens_seen)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.interval.flush(self.state.num_input_tokens_seen))
        super().log(logs, start_time)

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


class TokenInterval:
    """Positions and real tokens of the batches since the last log (this process's), and the real tokens/s
    from the Trainer's token count (every process's: `num_input_tokens_seen` is gathered)."""

    def __init__(self) -> None:
        self.positions = 0
        self.real = 0
        self.started: float | None = None
        self.tokens_at_start = 0

    def add(self, inputs: dict[str, Any], tokens_seen: int) -> None:
        if self.started is None:
            self.started, self.tokens_at_start = time.perf_counter(), tokens_seen or 0
        ids = inputs.get("input_ids")
        if ids is None:
            return
        mask = inputs.get("attention_mask")
        self.positions += ids.numel()
        self.real += int(mask.sum()) if mask is not None else ids.numel()

    def flush(self, tokens_seen: int) -> dict[str, float]:
        out: dict[str, float] = {}
        now = time.perf_counter()
        tokens = tokens_seen or 0
        if self.started is not None and now > self.started and tokens >= self.tokens_at_start:
            out["tokens_per_second"] = round((tokens - self.tokens_at_start) / (now - self.started), 1)
        if self.positions:
            out["padding_ratio"] = round(1 - self.real / self.positions, 4)
        self.positions = self.real = 0
        self.started, self.tokens_at_start = now, tokens
        return out
