"""Planned batches: every row exactly once, token budgets held (sum when packed, rows × longest when
padded), length grouping cuts padding against a random plan, and the config refuses settings that would
do nothing or contradict each other."""

from __future__ import annotations

import itertools
import random

import pytest

from vlmtune.config import ConfigError, TrainConfig, from_dict
from vlmtune.data.batching import batch_cost, padding_stats, plan_batches
from vlmtune.errors import VlmtuneError

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(20, 400) for _ in range(200)]


def rows_once(batches: list[list[int]]) -> bool:
    return sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("group", [True, False])
def test_token_budget_is_held_and_every_row_comes_once(packed, group):
    batches = plan_batches(LENGTHS, 1, seed=3, group_by_length=group, max_tokens=1200, packed=packed)
    assert rows_once(batches)
    assert all(batch_cost([LENGTHS[i] for i in b], packed) <= 1200 for b in batches)
    # Greedy filling: adding the next batch's first row would have broken the budget.
    for b, nxt in itertools.pairwise(batches):
        assert batch_cost([LENGTHS[i] for i in [*b, nxt[0]]], packed) > 1200


def test_group_by_length_cuts_padding_and_is_seeded():
    plain = plan_batches(LENGTHS, 8, seed=0)
    grouped = plan_batches(LENGTHS, 8, seed=0, group_by_length=True)
    assert rows_once(plain) and rows_once(grouped)
    assert all(len(b) == 8 for b in grouped[:-1])
    assert (
        padding_stats(grouped, LENGTHS, False)["padding_ratio"]
        < 0.5 * (padding_stats(plain, LENGTHS, False)["padding_ratio"])
    )
    assert grouped == plan_batches(LENGTHS, 8, seed=0, group_by_length=True)
    assert grouped != plan_batches(LENGTHS, 8, seed=1, group_by_length=True)
    assert padding_stats(plain, LENGTHS, True)["padding_ratio"] == 0


def test_a_row_longer_than_the_budget_is_refused():
    with pytest.raises(
        VlmtuneError, match=r"max_tokens_per_batch=100 is smaller than the longest row \(4\d\d tokens\)"
    ):
        plan_batches([50, 450, 60], 1, seed=0, max_tokens=100)


def base(**extra) -> dict:
    return {"model": "m", "output_dir": "o", "data": {"train": "t.jsonl"}, **extra}


def test_config_keys():
    cfg = from_dict(TrainConfig, base()).validate()
    assert (cfg.packing, cfg.group_by_length, cfg.max_tokens_per_batch) == ("auto", False, None)
    with pytest.raises(ConfigError, match="packing must be one of 'auto', 'on', 'off'"):
        from_dict(TrainConfig, base(packing="yes"))
    with pytest.raises(ConfigError, match=r"group_by_length .* packing: auto may pack batches"):
        from_dict(TrainConfig, base(group_by_length=True)).validate()
    assert from_dict(TrainConfig, base(group_by_length=True, packing="off")).validate().group_by_length
    with pytest.raises(ConfigError, match=r"set either batch_size \(4\) or max_tokens_per_batch \(2048\)"):
        from_dict(TrainConfig, base(batch_size=4, max_tokens_per_batch=2048)).validate()
    with pytest.raises(ConfigError, match="max_tokens_per_batch must be positive"):
        from_dict(TrainConfig, base(max_tokens_per_batch=0)).validate()
    with pytest.raises(ConfigError, match="did you mean 'packing'"):
        from_dict(TrainConfig, base(neat_packing=True))
