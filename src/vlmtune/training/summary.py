"""What an adapter's manifest records about its training: the whole resolved config (derived from the
config dataclass, so a new setting is recorded without anyone remembering to copy it), plus the figures
only the run knows (steps, tokens, last losses, resolved precision, whether batches were packed, world size, data counts)."""

from __future__ import annotations

from typing import Any

from ..adapters.targets import TargetPlan
from ..config import TrainConfig, to_dict
from ..data import DataReport


def training_summary(
    cfg: TrainConfig,
    state: Any,
    plan: TargetPlan,
    train: DataReport,
    evaluation: DataReport | None,
    precision: str,
    *,
    packed: bool = False,
    world_size: int = 1,
) -> dict[str, Any]:
    """`state` is the Trainer's `TrainerState` at the save."""
    losses = [row["loss"] for row in state.log_history if "loss" in row]
    evals = [row["eval_loss"] for row in state.log_history if "eval_loss" in row]
    return {
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "tokens": state.num_input_tokens_seen,
        "last_loss": losses[-1] if losses else None,
        "last_eval_loss": evals[-1] if evals else None,
        "trainable_params": plan.trainable_params,
        "precision": precision,
        "packed": packed,
        "world_size": world_size,
        "data": {"train": train.to_dict(), "eval": evaluation.to_dict() if evaluation else None},
        "config": to_dict(cfg),
    }
