"""What the CLI modules share: the consoles, the default model, and options defined once.

``cli.py`` (the Typer app), ``cli_convert``, ``cli_generate`` and ``cli_lora`` import these; each
option is an ``Annotated`` alias so its flag names and help text live in one place.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, TaskID

from mlx_openelm.choices import DType, RepetitionScope

DEFAULT_MODEL = "apple/OpenELM-270M-Instruct"

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


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
    float | None,
    typer.Option(
        "--repetition-penalty",
        help="Penalty > 1 discourages repeats (Apple uses 1.2: the chat/serve default for "
        "Instruct models).",
    ),
]
RepContextOpt = Annotated[
    int,
    typer.Option(
        "--repetition-context-size", help="Tokens the window-scope repetition penalty looks at."
    ),
]
RepScopeOpt = Annotated[
    RepetitionScope | None,
    typer.Option(
        "--repetition-scope",
        help="context: every token of prompt and reply (Hugging Face, Apple's examples; the "
        "chat/serve default for Instruct models); window: the last --repetition-context-size "
        "tokens (mlx-lm; the default otherwise).",
    ),
]
PresenceOpt = Annotated[
    float,
    typer.Option(
        "--presence-penalty", help="OpenAI's: minus this for each token already generated."
    ),
]
FrequencyOpt = Annotated[
    float,
    typer.Option(
        "--frequency-penalty", help="OpenAI's: minus this times how often a token was generated."
    ),
]
LogitBiasOpt = Annotated[
    list[str] | None,
    typer.Option("--logit-bias", help="ID=BIAS added to a token's logit, -100..100 (repeatable)."),
]
PromptLookupOpt = Annotated[
    int | None,
    typer.Option(
        "--prompt-lookup",
        help="Prompt-lookup decoding: up to N tokens copied from the context, checked in one "
        "pass (same output, faster on quoting). 0 = off; default off, 10 for Instruct models "
        "in chat/serve (Apple's prompt_lookup_num_tokens).",
    ),
]
LookupNgramOpt = Annotated[
    int,
    typer.Option(
        "--prompt-lookup-ngram",
        help="Longest n-gram prompt lookup matches, tried first (Hugging Face: 2).",
    ),
]
LookupMinNgramOpt = Annotated[
    int,
    typer.Option(
        "--prompt-lookup-min-ngram",
        help="Shortest n-gram prompt lookup proposes from (vLLM's prompt_lookup_min).",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace OUTPUT if it exists.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
DTypeOpt = Annotated[DType | None, typer.Option("--dtype", help="Weight dtype of the output.")]
FastBlasOpt = Annotated[
    bool,
    typer.Option("--fast-blas", help="Linux CPU: restart with OpenBLAS preloaded (see doctor)."),
]


def apply_fast_blas(enabled: bool) -> None:
    """Restart the command with OpenBLAS preloaded (does not return), or say why not."""
    if enabled:
        from mlx_openelm.doctor import reexec_with_openblas

        reason = reexec_with_openblas(sys.orig_argv)
        if reason:
            err.print(f"[yellow]{reason}[/]", markup=True)


class LazyProgress(Progress):
    """A rich ``Progress`` that draws nothing until its first task is added.

    Entering it does not start the display, so an error raised before any progress (bad input,
    found while loading) prints its one line alone, not after the blank line an empty display
    leaves when it stops.
    """

    def __enter__(self) -> LazyProgress:
        return self

    def add_task(self, *args: Any, **kwargs: Any) -> TaskID:  # Progress.add_task's signature
        if not self.live.is_started:
            self.start()
        return super().add_task(*args, **kwargs)

    def stop(self) -> None:
        # rich ends the display with a newline off a terminal, even one never started or
        # transient (drawn nowhere): keep it only for a display that leaves its last frame.
        if not self.live.is_started:
            return
        if self.live.transient:
            self.live.stop()
        else:
            super().stop()
