"""Distributed training, the fast part (no second process): the family's blocks, the strategy's Trainer
arguments, the preflight refusals, the every-rank image row and the save integrity check."""

from __future__ import annotations

import pytest
import torch

from vlmtune import families, tiny


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_every_family_names_its_blocks(name):
    family = families.get(name)
    model, _ = tiny.build(name, "tiny", 0, None, False)
    assert family.block_lists, f"{name} declares no block_lists (FSDP2 would have nothing to shard)"
    for path in family.block_lists:
        blocks = model.get_submodule(path)
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0, path
    # No stack of blocks is forgotten (an unlisted one would sit in the root unit, gathered whole).
    stacks = {n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1}
    assert stacks <= set(family.block_lists)
