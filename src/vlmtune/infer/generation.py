"""Decoding settings to a GenerationConfig, and a batch's outputs to per-row results (texts, prompt logits)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .types import Generation, GenerationSettings


def generation_config(base_model: Any, tokenizer: Any, settings: GenerationSettings) -> Any:
    """A fresh GenerationConfig: the base's special token ids, our decoding settings (never the base's
    sampling defaults, which make runs incomparable; LLaMA-Factory #3096)."""
    from transformers import GenerationConfig

    base = base_model.generation_config
    eos = base.eos_token_id if base.eos_token_id is not None else tokenizer.eos_token_id
    pad = base.pad_token_id if base.pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "bos_token_id": base.bos_token_id,
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or 0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if settings.repetition_penalty is not None:
        kwargs["repetition_penalty"] = settings.repetition_penalty
    return GenerationConfig(**kwargs)


def stop_tokens(config: Any) -> set[int]:
    """The token ids that end a reply under `config`."""
    eos = config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def generations(
    output: torch.Tensor, encoded: Any, config: Any, tokenizer: Any, adapters: Sequence[str]
) -> list[Generation]:
    """One `Generation` per row of `model.generate`'s output (prompt cut off, cut at the first stop token)."""
    prompt_len = encoded["input_ids"].shape[1]
    lengths = encoded["attention_mask"].sum(dim=1).tolist()
    stops = stop_tokens(config)
    out = []
    for row, adapter in enumerate(adapters):
        tokens = output[row, prompt_len:].tolist()
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        kept = tokens if cut is None else tokens[:cut]
        out.append(
            Generation(
                text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                adapter=adapter,
                prompt_tokens=int(lengths[row]),
                generated_tokens=len(tokens) if cut is None else cut + 1,
                finish_reason="length" if cut is None else "stop",
            )
        )
    return out


def prompt_logits(logits: torch.Tensor, encoded: Any) -> list[torch.Tensor]:
    """Each row's logits over its own prompt tokens (left padding removed), float32 on CPU."""
    lengths = encoded["attention_mask"].sum(dim=1).tolist()
    return [logits[row, logits.shape[1] - int(n) :].float().cpu() for row, n in enumerate(lengths)]
