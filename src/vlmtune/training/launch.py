"""`vlmtune train CONFIG --nproc N`: the same command under torchrun (`torch.distributed.run`), one node.

A shortcut only: `torchrun --nproc_per_node N -m vlmtune train CONFIG` (multi-node: `--nnodes`, a
rendezvous endpoint) and `accelerate launch -m vlmtune train CONFIG` run exactly the same code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import ConfigError


def launch(config: str | Path, overrides: Sequence[str], nproc: int, extra: Sequence[str] = ()) -> int:
    """Run `vlmtune train` in `nproc` processes on this machine; returns torchrun's exit status."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {nproc}).")
    if "WORLD_SIZE" in os.environ:
        raise ConfigError(
            "--nproc starts the processes itself; under torchrun or accelerate launch leave it out."
        )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "vlmtune",
        "train",
        str(config),
        *overrides,
        *extra,
    ]
    # An argument list, never a shell: nothing the user typed is interpreted.
    return subprocess.run(command, check=False).returncode
