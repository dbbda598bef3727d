"""The `vlmtune` command: parses arguments and calls one library function per verb; no logic here.

The commands live here and in `servers` (serve, ui); `common` holds the app and the shared options."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import families
from ..errors import VlmtuneError
from .common import (
    AdapterOption,
    DeviceOption,
    DtypeOption,
    QuantizationOption,
    SampleOption,
    TemperatureOption,
    TopPOption,
    app,
    given,
)


@app.command()
def tiny(
    family: Annotated[str, typer.Argument(help=" | ".join(families.FAMILIES))],
    out_dir: Annotated[Path, typer.Argument(help="folder to write (must not exist or be empty)")],
    seed: Annotated[int | None, typer.Option(help="seed for weights")] = None,
    size: Annotated[str | None, typer.Option(help="tiny (~0.3 M params) | small (~25 M params)")] = None,
    layout: Annotated[
        str | None, typer.Option(help="original (hub names, as save_pretrained) | runtime")
    ] = None,
    max_shard_size: Annotated[str | None, typer.Option(help="split weights into shards, e.g. 200KB")] = None,
) -> None:
    """Write a tiny random checkpoint folder of a family (for tests, demos and benchmarks)."""
    from .. import tiny as tiny_mod

    out = tiny_mod.write(
        family, out_dir, **given(size=size, seed=seed, layout=layout, max_shard_size=max_shard_size)
    )
    typer.echo(f"wrote {out}")


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="a model folder, hub id, or adapter folder")],
    base: Annotated[str | None, typer.Option(help="for an adapter: the base to check it against")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Say what a model or adapter folder is: family, roles, LoRA targets, fit to a base."""
    from ..inspection import inspect_path, render

    report = inspect_path(path, base=base)
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))


# --- merge ---
@app.command()
def merge(
    base: Annotated[str, typer.Option(help="base model: local folder or hub id (safetensors)")],
    adapter: Annotated[
        list[str],
        typer.Option(help="adapter folder (PEFT or a family's format); repeat to merge several, in order"),
    ],
    out: Annotated[Path, typer.Option(help="output folder (written atomically)")],
    dtype: Annotated[str | None, typer.Option(help="auto (the base's) | bf16 | fp16 | fp32")] = None,
    max_shard_size: Annotated[str | None, typer.Option(help="largest output shard, e.g. 5GB, 500MB")] = None,
    verify: Annotated[
        bool, typer.Option(help="compare logits with base + adapter un-merged (imports torch/PEFT)")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty OUT")] = False,
) -> None:
    """Merge LoRA adapter(s) into the base, streaming tensor by tensor, into a standalone model folder."""
    from ..merging import merge as run_merge

    result = run_merge(
        base,
        adapter,
        out,
        **given(dtype=dtype, max_shard_size=max_shard_size),
        verify=verify,
        overwrite=overwrite,
        progress=lambda shard: typer.echo(f"wrote {shard}", err=True),
    )
    typer.echo(result.summary())


# --- end merge ---


# --- inference ---


@app.command()
def predict(
    model: Annotated[str, typer.Option(help="base model: local folder or hub id")],
    data: Annotated[Path, typer.Option(help="rows: messages+images or conversations+image")],
    out: Annotated[Path, typer.Option(help="predictions JSONL to write")],
    adapter: AdapterOption = None,
    batch_size: Annotated[int | None, typer.Option(help="rows per forward")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="cap on generated tokens per row")] = None,
    sample: SampleOption = False,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    top_k: Annotated[int | None, typer.Option(help="top-k sampling")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    quantization: QuantizationOption = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run a dataset through the base and adapters (un-merged); write predictions, report scores and speed."""
    from ..infer import GenerationSettings
    from ..infer.predict import predict as run_predict
    from ..infer.specs import parse_adapter_specs

    settings = GenerationSettings(
        **given(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
        do_sample=sample,
    )
    summary = run_predict(
        model,
        parse_adapter_specs(adapter or []),
        data,
        out,
        **given(batch_size=batch_size, dtype=dtype),
        settings=settings,
        device=device,
        quantization=quantization,
        progress=progress,
    )
    typer.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.render())


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="base model: local folder or hub id")],
    adapter: AdapterOption = None,
    image: Annotated[str | None, typer.Option(help="an image for the first message")] = None,
    use: Annotated[str | None, typer.Option(help="adapter to start with (default: the first)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="cap on generated tokens per reply")] = None,
    sample: SampleOption = False,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    quantization: QuantizationOption = None,
) -> None:
    """Chat in the terminal with images; /adapter NAME switches adapters, /image PATH attaches an image."""
    from dataclasses import replace

    from ..infer.chat import CHAT_SETTINGS, start_chat
    from ..infer.specs import parse_adapter_specs

    start_chat(
        model,
        parse_adapter_specs(adapter or []),
        adapter=use,
        image=image,
        settings=replace(
            CHAT_SETTINGS,
            **given(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p),
            do_sample=sample,
        ),
        **given(dtype=dtype),
        device=device,
        quantization=quantization,
    )


# --- end inference ---


# --- training ---
data_app = typer.Typer(help="Training data: check files before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _console_logging() -> None:
    """vlmtune's own progress lines (plan, data summary, where the adapter went) on stderr."""
    import logging

    logger = logging.getLogger("vlmtune")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config (docs/training.md lists every key)")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="dotted key=value overrides, e.g. lora.r=16 lr=2e-4")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="list LoRA / fully trained modules by role with parameter counts, then exit"
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="with --dry-run or --estimate: print JSON")] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check", help="one forward/backward on a real batch: name modules that get no gradient"
        ),
    ] = False,
    nproc: Annotated[
        int | None,
        typer.Option(help="train in N processes on this machine (torchrun); see docs/distributed.md"),
    ] = None,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate", help="print the expected memory per rank (for --nproc N processes), then exit"
        ),
    ] = False,
    gpu: Annotated[
        bool, typer.Option("--gpu", help="with --estimate: for CUDA GPUs, even from a machine without one")
    ] = False,
) -> None:
    """Train a LoRA adapter; writes the run dir (config.yaml, metrics.jsonl, loss.png, checkpoints/, adapter/).
    Works unchanged under `torchrun` and `accelerate launch` (`-m vlmtune train CONFIG`)."""
    from .. import training

    _console_logging()
    if estimate:
        if dry_run or check:
            raise VlmtuneError("--estimate runs alone; drop --dry-run / --check (run them one at a time).")
        from ..training.estimate import estimate as run_estimate

        figures = run_estimate(config, overrides or [], nproc, gpu=True if gpu else None)
        typer.echo(figures.to_json() if as_json else figures.render())
        return
    if gpu:
        raise VlmtuneError("--gpu goes with --estimate (training uses the GPUs it finds).")
    if dry_run:
        plan = training.dry_run(config, overrides or [])
        typer.echo(json.dumps(plan.to_dict(), indent=2) if as_json else plan.render())
        return
    if check:
        from ..training.check import check_gradients

        typer.echo(check_gradients(config, overrides or []).render())
        return
    if nproc is not None:
        from ..training.launch import launch

        raise typer.Exit(launch(config, overrides or [], nproc))
    run_dir = training.run(config, overrides or [])
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"run dir: {run_dir}\nadapter: {run_dir / 'adapter'}")


@data_app.command("check")
def data_check(
    file: Annotated[Path, typer.Argument(help="data file (.json, .jsonl, .parquet) or datasets folder")],
    model: Annotated[
        str | None, typer.Option(help="also tokenize every row with this base's processor")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="with --model: count rows truncated at this length")
    ] = None,
    loss_on: Annotated[str | None, typer.Option(help="assistant | all")] = None,
    show: Annotated[int, typer.Option(help="print at most this many row errors")] = 100,
) -> None:
    """Check every row as `vlmtune train` does (structure, images, tokens); exit 2 when any row is invalid."""
    from ..data.check import check_data, processor_for, render

    processor = processor_for(model) if model is not None else None
    report = check_data(file, processor=processor, max_length=max_length, **given(loss_on=loss_on))
    render(report, show=show, echo=typer.echo)
    if report.invalid_rows:
        raise VlmtuneError(
            f"{report.invalid_rows} of {report.rows} rows in {file} are invalid (listed above)."
        )


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="folder for the demo (replaced on every run)")] = None,
    steps: Annotated[int | None, typer.Option(help="training steps")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for data, model and training")] = None,
) -> None:
    """The life cycle on a tiny Qwen2-VL: predict, train, predict un-merged, merge, reload (report.json)."""
    from transformers.utils import logging as hf_logging

    from ..demo import run_demo

    _console_logging()
    hf_logging.disable_progress_bar()  # the demo loads and saves tiny models often: keep its output readable
    report = run_demo(**given(out=out, steps=steps, seed=seed))
    typer.echo(json.dumps(report, indent=2))


# --- end training ---


from . import servers  # noqa: E402, F401  (registers serve and ui after the commands above)


def main() -> None:
    """Entry point: user errors print one line and exit 2; anything else is a bug and keeps its traceback."""
    try:
        app()
    except VlmtuneError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
