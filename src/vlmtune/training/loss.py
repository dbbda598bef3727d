"""The training loss computed from the supervised positions' logits only.

With assistant-only labels most positions (image tokens, prompts) carry no loss, yet a causal LM head
projects every position onto the vocabulary: (batch, length, vocab) float logits, 150k wide for Qwen. The
collator passes `logits_to_keep` (a boolean mask of the positions whose next token is supervised), the model
projects only those rows, and this function takes the same token-level cross-entropy transformers'
`ForCausalLMLoss` would, normalised the same way (by `num_items_in_batch` under gradient accumulation).
"""

from __future__ import annotations

from typing import Any

from ..data.collate import IGNORE_INDEX


def supervised_token_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """Cross-entropy of `outputs.logits` (one row per kept position, row-major) against the next tokens."""
    import torch.nn.functional as F

    shifted = labels[:, 1:]
    targets = shifted[shifted != IGNORE_INDEX]
    logits = outputs.logits.float()
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise RuntimeError(
            f"expected one logit row per supervised token ({targets.shape[0]}), got {tuple(logits.shape)}; "
            "the batch must carry the collator's logits_to_keep mask."
        )
    total = F.cross_entropy(logits, targets.to(logits.device), reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    count = max(count, 1) if isinstance(count, int) else count.clamp(min=1).to(total.device)
    return total / count
