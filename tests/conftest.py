"""Shared fixtures: tiny hub-style checkpoint folders, written once per test session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config) -> None:
    """One intra-op thread per test process: the models are tiny, and with pytest-xdist two workers with
    two OpenMP threads each on 2 cores slow every step down many times over."""
    import torch

    torch.set_num_threads(1)


def _family_names() -> tuple[str, ...]:
    from vlmtune import families

    return tuple(families.FAMILIES)


# Every registered family: a new folder under families/ joins the whole test matrix with no edit here.
FAMILY_NAMES = _family_names()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[..., Path]:
    """`tiny_model("llava")` -> path of a tiny llava folder (written on first use, then reused).

    Keyword arguments go to `vlmtune.tiny.write` (seed, layout, max_shard_size, overrides...). Treat the
    folder as read-only: tests that write must write elsewhere.
    """
    from vlmtune import tiny

    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[tuple, Path] = {}

    def get(family: str, **kwargs) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in made:
            made[key] = tiny.write(family, root / f"{family}-{len(made)}", **kwargs)
        return made[key]

    return get


@pytest.fixture(params=FAMILY_NAMES)
def family_name(request) -> str:
    return request.param
