"""Choosing each row's next token from its own logits, with its own settings and its own random generator,
so a seeded request samples the same tokens whatever else shares its batch; and the log-probabilities
OpenAI's `logprobs` / `top_logprobs` report (of the model's distribution, before temperature)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax), the default
    top_p: float = 1.0
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def generator(self, offset: int) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed + offset)
        return generator


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token of one row (`logits`: its last-position logits, 1-D)."""
    if sampling.temperature == 0 or generator is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def logprob_entry(logits: torch.Tensor, token: int, top: int, tokenizer: Any) -> dict[str, Any]:
    """OpenAI's `{"token", "logprob", "bytes", "top_logprobs": [...]}` for a chosen token."""
    logp = torch.log_softmax(logits.float(), dim=-1)

    def item(t: int) -> dict[str, Any]:
        text = tokenizer.decode([t])
        return {"token": text, "logprob": float(logp[t]), "bytes": list(text.encode("utf-8"))}

    entry = item(token)
    entry["top_logprobs"] = []
    if top:
        values, indices = torch.topk(logp, min(top, logp.shape[-1]))
        entry["top_logprobs"] = [item(int(i)) for i in indices.tolist()]
        del values
    return entry
