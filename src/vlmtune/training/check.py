"""`vlmtune train CONFIG --check`: one forward and backward on a real batch, before a long job.

The standard advice for projector tuning is to check that gradients really flow: a projector that never
sees an image, a path cut by a frozen module or by checkpointing, a LoRA target that is never called all
train nothing, silently. This names, by role, every trainable module whose parameters got no gradient or a
zero one, and checks the loss is finite. A LoRA module counts as reached when any of its factors got a
gradient (at initialisation `lora_B` is zero, so `lora_A`'s gradient is zero by design). Nothing is written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoint, families
from ..config import TrainConfig, load_train_config
from ..errors import VlmtuneError

# Parameter name -> the module it trains: PEFT's LoRA factors and modules_to_save copies, adapter name dropped.
_LORA = re.compile(r"\.(lora_[A-Za-z_]+|modules_to_save)\.[^.]+\..*$")


@dataclass
class GradientReport:
    loss: float
    rows: int
    modules: dict[str, list[str]] = field(default_factory=dict)  # role -> trained modules reached
    dead: dict[str, list[str]] = field(default_factory=dict)  # role -> trained modules without gradient

    def render(self) -> str:
        reached = sum(len(v) for v in self.modules.values())
        lines = [f"loss {self.loss:.4f} on {self.rows} rows; {reached} trained modules got a gradient"]
        lines += [f"  {role}: {len(names)} modules" for role, names in sorted(self.modules.items())]
        return "\n".join(lines)


def module_of(param_name: str) -> str:
    name = param_name.removeprefix("base_model.model.")
    return _LORA.sub("", name) if _LORA.search(name) else name.rsplit(".", 1)[0]


def check_gradients(
    config: TrainConfig | str | Path | dict[str, Any], overrides: Sequence[str] = ()
) -> GradientReport:
    """Run the check; raises a one-line VlmtuneError naming what got no gradient, or a non-finite loss."""
    import torch

    from ..data.collate import SampleDataset
    from .arguments import pick_precision
    from .batches import make_collator
    from .loss import supervised_token_loss
    from .recipe import (
        checkpoint_part,
        image_limits,
        load_model,
        load_processor,
        make_plan,
        prepare_data,
        wrap_peft,
    )

    cfg = load_train_config(config, overrides)
    folder = checkpoint.resolve(cfg.model)
    family = families.detect(checkpoint.read_config(folder))
    processor = load_processor(folder, image_limits(cfg, family))
    train, _ = prepare_data(cfg, processor, family)
    torch.manual_seed(cfg.seed)
    base = load_model(folder, pick_precision(cfg.precision), cfg, family)
    model = wrap_peft(base, make_plan(base, family, cfg), cfg)
    if cfg.gradient_checkpointing in ("language", "vision"):
        checkpoint_part(model, family, cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:  # as the Trainer's activation_checkpointing argument does for `true`
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    collator = make_collator(cfg, processor, family, model, packed=False)
    rows = SampleDataset(train.samples)
    # A real batch, images first: the check is about what a batch with images reaches.
    order = sorted(range(len(rows)), key=lambda i: not rows.samples[i].images)[: max(1, cfg.batch_size)]
    batch = collator([rows[i] for i in order])
    model.train()
    labels = batch.pop("labels")  # as the Trainer does with a compute_loss_func
    loss = supervised_token_loss(model(**batch), labels)
    loss.backward()
    report = GradientReport(loss=float(loss.detach()), rows=len(order))
    reached: dict[str, bool] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            got = param.grad is not None and bool(param.grad.abs().sum() > 0)
            reached[module_of(name)] = reached.get(module_of(name), False) or got
    for module, ok in reached.items():
        role = family.role_of(module) or "other"
        (report.modules if ok else report.dead).setdefault(role, []).append(module)
    if not math.isfinite(report.loss):
        raise VlmtuneError(
            f"--check: the loss on {report.rows} real rows is {report.loss}; lower lr or check the data."
        )
    if report.dead:
        named = "; ".join(f"{role}: {', '.join(_short(m))}" for role, m in sorted(report.dead.items()))
        raise VlmtuneError(
            f"--check: trained modules got no gradient on a real batch ({named}); they would not train "
            "(e.g. a projector whose rows have no image, or a path cut by a frozen module)."
        )
    return report


def _short(modules: list[str], show: int = 3) -> list[str]:
    return modules[:show] + ([f"... {len(modules) - show} more"] if len(modules) > show else [])
