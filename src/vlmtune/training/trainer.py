"""The Trainer subclass: only what `transformers.Trainer` cannot be configured to do."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from transformers import Trainer, TrainerCallback


class VlmTrainer(Trainer):
    """`Trainer` with extra learning-rate groups (e.g. `projector_lr`): the default optimizer is built, then
    each group's parameters move into a copy of their group with its own lr. Weight decay grouping, the
    scheduler (which scales every group's lr) and checkpointing stay the Trainer's.

    Every step log also gets the interval's real (non-padding) tokens/s and padding ratio, so metrics.jsonl
    and the progress line show what padding costs (packed batches: 0)."""

    def __init__(
        self,
        *args: Any,
        group_lrs: Sequence[tuple[set[str], float]] = (),
        strategy: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.strategy = strategy  # set when several processes train: the wrapper asserted before step 1
        super().__init__(*args, **kwargs)
        self.group_lrs = list(group_lrs)  # (parameter names, lr): names survive FSDP2's new parameters
        self.interval = TokenInterval()

    def image_only_grads_to_none(self, image_only: set[str]) -> None:
        """Before the optimizer step: if no process had a real image since the last step, the gradients of
        the `image_only` parameters came from the every-rank image row alone; drop them (see batches)."""
        import torch
        import torch.distributed as dist

        seen = torch.tensor([getattr(self, "real_images", 0)], device=self.args.device)
        if dist.is_initialized():
            dist.all_reduce(seen)
        self.real_images = 0
        if int(seen.item()) == 0:
            from .integrity import trained_parameters

            for name, param in trained_parameters(self.model):
                if name in image_only:
                    param.grad = None

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.strategy == "fsdp2" and not self.is_fsdp_enabled:
            from .distributed import enable_fsdp_on_cpu

            enable_fsdp_on_cpu(self)  # accelerate's CPU fallback to DDP, switched off (see distributed)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.strategy != "fsdp2":
            return super().train(*args, **kwargs)
        from .distributed import trained_leaves_own_units

        with trained_leaves_own_units():  # accelerate wraps the model inside train (see distributed)
            return super().train(*args, **kwargs)

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        from .batches import REAL_IMAGES

        inputs.pop(REAL_IMAGES, None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Several processes: every checkpoint's adapter comes from the one gather the final save uses
        (`integrity.gather_adapter`), written by rank 0, then re-read by `CompleteCheckpoints`."""
        if not self.strategy:
            return super().save_model(output_dir, _internal_call)
        from .integrity import gather_adapter, plain_module_names

        model = self.accelerator.unwrap_model(self.model)
        with plain_module_names(model):  # the adapter's keys without activation checkpointing's prefix
            state = gather_adapter(model)
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir, state_dict=state)
        return None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """PEFT's save, plus the bare parameters trained in full that PEFT does not save (see
        `adapters.save.add_bare`), so a checkpoint (and a resume from it) holds them."""
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            from ..adapters.save import add_bare

            add_bare(
                self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir, state_dict
            )

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        from .batches import REAL_IMAGES

        real = inputs.pop(REAL_IMAGES, None)
        if real is not None:
            self.real_images = getattr(self, "real_images", 0) + int(real.sum().item())
        if self.strategy and self.state.global_step == 0 and not getattr(self, "_wrapper_checked", False):
            from .distributed import check_wrapped

            check_wrapped(self.model_wrapped, self.strategy)
            self._wrapper_checked = True
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
        names = {id(p): n for n, p in (model or self.model).named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            rest = list(group["params"])
            settings = {k: v for k, v in group.items() if k != "params"}
            for chosen_names, lr in self.group_lrs:
                ids = {i for i, n in names.items() if n in chosen_names}
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


class DropImageOnlyGrads(TrainerCallback):
    """Calls `VlmTrainer.image_only_grads_to_none` before every optimizer step (several processes only)."""

    def __init__(self, trainer: VlmTrainer, image_only: set[str]) -> None:
        self.trainer = trainer
        self.image_only = image_only

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.image_only_grads_to_none(self.image_only)
