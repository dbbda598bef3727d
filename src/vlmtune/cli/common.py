"""What every command module of the `vlmtune` command shares: the typer app, the options several commands
take (written once), and `given` (options the user set)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

app = typer.Typer(
    name="vlmtune",
    help="The LoRA life cycle of vision-language models: train, run un-merged, merge, inspect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

AdapterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter",
        help="[NAME=]DIR of an adapter to attach un-merged; repeat for several (NAME: folder name)",
    ),
]


def given(**options: Any) -> dict[str, Any]:
    """The options the user set: the rest are left to the library function, whose signature is the one
    place a default is written."""
    return {k: v for k, v in options.items() if v is not None}


# Options of the commands that load a model (predict, chat, serve, ui); their defaults are the library's.
DtypeOption = Annotated[str | None, typer.Option(help="auto (the checkpoint's) | bf16 | fp16 | fp32")]
DeviceOption = Annotated[
    str | None, typer.Option(help="cpu | cuda | cuda:N | auto (default: cuda if present)")
]
QuantizationOption = Annotated[str | None, typer.Option(help="4bit | 8bit (bitsandbytes; CPU or CUDA)")]
SampleOption = Annotated[bool, typer.Option(help="sample instead of greedy decoding")]
TemperatureOption = Annotated[float | None, typer.Option(help="sampling temperature")]
TopPOption = Annotated[float | None, typer.Option(help="nucleus sampling")]
