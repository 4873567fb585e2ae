"""The ``mlx-openelm`` command line: thin Typer commands over library functions.

Every command parses its options, calls one library function and prints. Library errors
(``OpenELMError``) become one red line and exit code 1; ``--debug`` shows the traceback instead.
Shared options are defined once below as ``Annotated`` aliases.

This file lives at the repository root and is installed as ``mlx_openelm.cli`` (through the
``mlx_openelm/cli.py`` symlink; see the README's development notes).
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from mlx_openelm import __version__
from mlx_openelm.errors import OpenELMError

DEFAULT_MODEL = "apple/OpenELM-270M-Instruct"

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)
_state = {"debug": False}


class _Group(TyperGroup):
    """Maps every user-fixable error to one red line and exit 1 (a single CLIError path)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OpenELMError as e:
            if _state["debug"]:
                raise
            err.print(f"[bold red]Error:[/] {e}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            err.print("[yellow]Interrupted.[/]")
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    name="mlx-openelm",
    help="Convert, chat with and LoRA fine-tune Apple's OpenELM models on-device with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


class DType(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


# --- Options shared by several commands: defined once, defaults in one place. ---
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="MLX model folder or hub repo id (converted once).")
]
AdapterOpt = Annotated[Path | None, typer.Option("--adapter", help="LoRA adapter folder to apply.")]
TokenizerOpt = Annotated[
    Path | None, typer.Option("--tokenizer", help="Explicit tokenizer.model file.")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (reproducible runs).")]
MaxTokensOpt = Annotated[
    int, typer.Option("--max-tokens", "-n", help="Maximum number of tokens to generate.")
]
TempOpt = Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 = greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Sample from the k best tokens; 0 = off.")]
MinPOpt = Annotated[float, typer.Option("--min-p", help="Drop tokens below min-p × best; 0 = off.")]
RepPenaltyOpt = Annotated[
    float | None, typer.Option("--repetition-penalty", help="Penalty > 1 discourages repeats.")
]
RepContextOpt = Annotated[
    int, typer.Option("--repetition-context-size", help="Tokens the repetition penalty looks at.")
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace OUTPUT if it exists.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
DTypeOpt = Annotated[DType | None, typer.Option("--dtype", help="Weight dtype of the output.")]


def _version(value: bool) -> None:
    if value:
        out.print(f"mlx-openelm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    _state["debug"] = debug


@app.command()
def info(model: ModelOpt = DEFAULT_MODEL, as_json: JsonOpt = False) -> None:
    """Show a model folder's architecture: sizes, per-layer heads and FFN widths, quantization."""
    from mlx_openelm.info import describe_model

    desc = describe_model(model)
    if as_json:
        import json

        out.print(json.dumps(desc, indent=2))
        return
    out.print(f"[bold]{desc['path']}[/]")
    for key in (
        "parameters",
        "layers",
        "model_dim",
        "head_dim",
        "vocab_size",
        "dtype",
        "quantization",
        "chat_template",
    ):
        out.print(f"  {key:<14} {desc[key]}")
    out.print(f"  {'q heads':<14} {desc['num_query_heads']}")
    out.print(f"  {'kv heads':<14} {desc['num_kv_heads']}")
    out.print(f"  {'ffn widths':<14} {desc['ffn_dims']}")


# === convert (converter issue) ===

# === generate / chat (generation issue) ===

# === lora / fuse / peft (LoRA issue) ===

# === eval / bench / doctor (evaluation issue) ===

# === serve (server issue) ===


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mlx-openelm")


if __name__ == "__main__":
    sys.exit(main())
