"""The long-running commands: `vlmtune serve` (the OpenAI-compatible server) and `vlmtune ui` (the
dashboard). Like every command: parse options, call one library function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# Light (no torch, no FastAPI): its field defaults are the options' defaults.
from ..serve.settings import ServeSettings
from .common import (
    AdapterOption,
    DeviceOption,
    DtypeOption,
    QuantizationOption,
    app,
    given,
)

# --- serve ---
SERVE = ServeSettings  # the defaults below are its fields' (class attributes): one place each is written


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="base model: local folder or hub id")],
    adapter: AdapterOption = None,
    host: Annotated[
        str, typer.Option(help="bind address (non-loopback needs --api-key or --insecure)")
    ] = SERVE.host,
    port: Annotated[int, typer.Option(help="TCP port")] = SERVE.port,
    api_key: Annotated[
        str | None, typer.Option(help="bearer key for every route but /health (default: env VLMTUNE_API_KEY)")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="allow a non-loopback bind without a key")] = SERVE.insecure,
    adapter_dir: Annotated[
        Path | None, typer.Option(help="POST /v1/adapters may load folders inside this one (default: off)")
    ] = None,
    image_dir: Annotated[
        Path | None,
        typer.Option(help="image paths / file:// URLs may name files inside this folder (default: off)"),
    ] = None,
    allow_remote_images: Annotated[
        bool, typer.Option(help="fetch http(s) image URLs (public addresses only)")
    ] = SERVE.allow_remote_images,
    max_batch_size: Annotated[int, typer.Option(help="rows decoding together")] = SERVE.max_batch_size,
    max_queue: Annotated[int, typer.Option(help="waiting requests before 429")] = SERVE.max_queue,
    max_tokens: Annotated[int, typer.Option(help="cap on max_tokens per request")] = SERVE.max_tokens,
    max_prompt_tokens: Annotated[
        int, typer.Option(help="prompt tokens per request")
    ] = SERVE.max_prompt_tokens,
    max_body_bytes: Annotated[int, typer.Option(help="cap on a request body")] = SERVE.max_body_bytes,
    max_image_bytes: Annotated[int, typer.Option(help="one image's encoded size")] = SERVE.max_image_bytes,
    max_image_pixels: Annotated[
        int, typer.Option(help="one image's width x height")
    ] = SERVE.max_image_pixels,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    quantization: QuantizationOption = None,
    print_vllm: Annotated[
        bool,
        typer.Option("--print-vllm", help="print the equivalent `vllm serve` line (or why not) and exit"),
    ] = False,
) -> None:
    """Serve the base and adapters with an OpenAI-compatible API and continuous batching."""
    from ..infer.specs import parse_adapter_specs
    from ..serve.run import print_vllm as vllm_line
    from ..serve.run import serve as run_serve

    adapters = parse_adapter_specs(adapter or [])
    if print_vllm:
        typer.echo(vllm_line(model, adapters))
        return
    settings = ServeSettings(
        host=host,
        port=port,
        api_key=api_key,
        insecure=insecure,
        adapter_dir=adapter_dir,
        image_dir=image_dir,
        allow_remote_images=allow_remote_images,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        max_tokens=max_tokens,
        max_prompt_tokens=max_prompt_tokens,
        max_body_bytes=max_body_bytes,
        max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels,
    )
    run_serve(model, adapters, settings, **given(dtype=dtype), device=device, quantization=quantization)


# --- end serve ---


# --- ui ---
@app.command()
def ui(
    runs: Annotated[
        list[Path] | None,
        typer.Option("--runs", help="folder of run dirs (or one run dir); repeat for several"),
    ] = None,
    model: Annotated[str | None, typer.Option(help="base model for side-by-side answers")] = None,
    adapter: AdapterOption = None,
    host: Annotated[
        str | None, typer.Option(help="address to bind (default: loopback); anything else needs --token")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port (default: the dashboard's, see docs/ui.md)")] = None,
    token: Annotated[
        str | None, typer.Option(envvar="VLMTUNE_UI_TOKEN", help="required token (bearer header or login)")
    ] = None,
    merge_dir: Annotated[
        Path | None, typer.Option(help="allow merges from the page, written only under this folder")
    ] = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
) -> None:
    """A local web dashboard: runs with live curves, data as the model sees it, adapters side by side, merges."""
    from ..infer.specs import parse_adapter_specs
    from ..ui import UiSettings, run_ui

    settings = UiSettings(
        runs=list(runs or []),
        model=model,
        adapters=parse_adapter_specs(adapter or []),
        **given(host=host, port=port),
        token=token,
        merge_dir=merge_dir,
    )
    run_ui(settings, device=device, **given(dtype=dtype))


# --- end ui ---
