"""The `vlmtune` command: parses arguments and calls one library function per verb; no logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import VlmtuneError

app = typer.Typer(
    name="vlmtune",
    help="The LoRA life cycle of vision-language models: train, run un-merged, merge, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def tiny(
    family: Annotated[str, typer.Argument(help="qwen2_vl | qwen2_5_vl | llava | mllama")],
    out_dir: Annotated[Path, typer.Argument(help="folder to write (must not exist or be empty)")],
    seed: Annotated[int, typer.Option(help="seed for weights")] = 0,
    size: Annotated[str, typer.Option(help="tiny (~0.3 M params) | small (~25 M params)")] = "tiny",
    layout: Annotated[
        str, typer.Option(help="original (hub names, as save_pretrained) | runtime")
    ] = "original",
    max_shard_size: Annotated[str | None, typer.Option(help="split weights into shards, e.g. 200KB")] = None,
) -> None:
    """Write a tiny random checkpoint folder of a family (for tests, demos and benchmarks)."""
    from . import tiny as tiny_mod

    out = tiny_mod.write(family, out_dir, size=size, seed=seed, layout=layout, max_shard_size=max_shard_size)
    typer.echo(f"wrote {out}")


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="a model folder, hub id, or adapter folder")],
    base: Annotated[str | None, typer.Option(help="for an adapter: the base to check it against")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Say what a model or adapter folder is: family, roles, LoRA targets, fit to a base."""
    from .inspection import inspect_path, render

    report = inspect_path(path, base=base)
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))


def main() -> None:
    """Entry point: user errors print one line and exit 2; anything else is a bug and keeps its traceback."""
    try:
        app()
    except VlmtuneError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
