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
PromptOpt = Annotated[
    str | None, typer.Option("--prompt", "-p", help="Prompt text; '-' reads it from stdin.")
]
SystemOpt = Annotated[
    str | None, typer.Option("--system", help="System prompt (plain text first for base models).")
]
StopOpt = Annotated[
    list[str] | None,
    typer.Option("--stop", help="Stop before this text (repeatable); it is never printed."),
]
DraftOpt = Annotated[
    str | None,
    typer.Option("--draft-model", help="Smaller OpenELM for speculative decoding (same vocab)."),
]
NumDraftOpt = Annotated[
    int, typer.Option("--num-draft", help="Tokens the draft model proposes per step.")
]
MaxKVOpt = Annotated[
    int | None, typer.Option("--max-kv-size", help="Rotating KV cache of this many tokens.")
]
KVBitsOpt = Annotated[
    int | None, typer.Option("--kv-bits", help="Quantize the KV cache to 2, 3, 4, 5, 6 or 8 bits.")
]
RawOpt = Annotated[bool, typer.Option("--raw", help="No chat template, even for instruct models.")]


def _sampling(max_tokens: int, **options: object) -> dict[str, object]:
    """Check the flags before a model loads, so a bad value fails at once."""
    from mlx_openelm.generate import validate_options

    validate_options(max_tokens=max_tokens, **{k: v for k, v in options.items() if k != "seed"})
    return options


def _conversion_notice(model: str):  # noqa: ANN202 - callback for the converter
    """One dim line per phase when a hub model is converted on first use."""
    phases: set[str] = set()

    def report(progress) -> None:  # noqa: ANN001 - mlx_openelm.convert.ConvertProgress
        if progress.phase not in phases:
            phases.add(progress.phase)
            what = "hashing the download" if progress.phase == "hash" else "converting it"
            err.print(f"First use of {model}: {what} (once; cached for later runs)", style="dim")

    return report


def _write(text: str) -> None:
    sys.stdout.write(text)  # not rich: model text must not be read as markup
    sys.stdout.flush()


@app.command()
def generate(
    model: ModelOpt = DEFAULT_MODEL,
    prompt: PromptOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepPenaltyOpt = None,
    repetition_context_size: RepContextOpt = 20,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    draft_model: DraftOpt = None,
    num_draft: NumDraftOpt = 3,
    max_kv_size: MaxKVOpt = None,
    kv_bits: KVBitsOpt = None,
    raw: RawOpt = False,
) -> None:
    """Generate text for a prompt, streamed to stdout; speed and memory go to stderr."""
    from mlx_openelm.errors import GenerationError
    from mlx_openelm.generate import build_prompt, format_stats, load_for_generation
    from mlx_openelm.generate import stream_generate as stream

    sampling = _sampling(
        max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
        seed=seed, stop=stop, max_kv_size=max_kv_size, kv_bits=kv_bits, num_draft_tokens=num_draft,
    )  # fmt: skip
    text = sys.stdin.read().rstrip("\n") if prompt == "-" else prompt
    if text is None:
        raise GenerationError("no prompt: give --prompt TEXT, or --prompt - to read stdin")
    m, tok, draft = load_for_generation(
        model, adapter, tokenizer, draft_model, on_progress=_conversion_notice(model)
    )
    ids = build_prompt(tok, text, system, raw)
    last, drafted = None, 0
    for r in stream(m, tok, ids, max_tokens, draft_model=draft, **sampling):
        _write(r.text)
        last, drafted = r, drafted + r.from_draft
    _write("\n")
    err.print(format_stats(last, drafted if draft else None), style="dim", markup=False)


class _TerminalIO:
    """The chat REPL's input and output: input() (line editing on a TTY), stdout, stderr."""

    def read(self, prompt: str) -> str | None:
        try:
            line = input(prompt)
        except EOFError:
            _write("\n")
            return None
        if not sys.stdin.isatty():
            _write(line + "\n")  # piped input is not echoed: show it, so stdout reads as a chat
        return line

    def write(self, text: str) -> None:
        _write(text)

    def info(self, text: str) -> None:
        err.print(text, style="dim", markup=False)

    def error(self, text: str) -> None:
        err.print("[bold red]Error:[/] ", end="")
        err.print(text, markup=False)


@app.command()
def chat(
    model: ModelOpt = DEFAULT_MODEL,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    repetition_penalty: RepPenaltyOpt = None,
    repetition_context_size: RepContextOpt = 20,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    draft_model: DraftOpt = None,
    num_draft: NumDraftOpt = 3,
    max_kv_size: MaxKVOpt = None,
    kv_bits: KVBitsOpt = None,
) -> None:
    """Chat in the terminal: streamed replies, history kept in the KV cache, /help for commands."""
    from mlx_openelm.chat import ChatSession, run_repl
    from mlx_openelm.generate import load_for_generation

    sampling = _sampling(
        max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
        seed=seed, stop=stop, max_kv_size=max_kv_size, kv_bits=kv_bits, num_draft_tokens=num_draft,
    )  # fmt: skip
    m, tok, draft = load_for_generation(
        model, adapter, tokenizer, draft_model, on_progress=_conversion_notice(model)
    )
    session = ChatSession(
        m, tok, system=system, max_tokens=max_tokens, draft_model=draft, **sampling
    )
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    err.print(f"Chatting with {model}. /help lists commands; /quit or Ctrl-D leaves.", style="dim")
    if run_repl(session, _TerminalIO()):
        raise typer.Exit(1)  # a scripted session had a failing command or turn


# === lora / fuse / peft (LoRA issue) ===

# === eval / bench / doctor (evaluation issue) ===
eval_app = typer.Typer(
    cls=TyperGroup,
    help="Measure model quality: perplexity over text, zero-shot multiple choice.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")
FastBlasOpt = Annotated[
    bool,
    typer.Option("--fast-blas", help="Linux CPU: restart with OpenBLAS preloaded (see doctor)."),
]


def _fast_blas(enabled: bool) -> None:
    """Restart the command with OpenBLAS preloaded (does not return), or say why not."""
    if enabled:
        from mlx_openelm.doctor import reexec_with_openblas

        reason = reexec_with_openblas(sys.orig_argv)
        if reason:
            err.print(f"[yellow]{reason}[/]", markup=True)


def _progress_bar(what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        f"[bold]{what}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def _run_with_progress(what: str, work):
    """Run ``work(on_progress)`` under a progress bar on stderr; return its result."""
    with _progress_bar(what) as bar:
        task = bar.add_task(what, total=None)
        return work(lambda done, total: bar.update(task, completed=done, total=total))


def _print_json(data) -> None:
    import json

    out.print(json.dumps(data, indent=2), markup=False)


@eval_app.command("perplexity")
def eval_perplexity(
    data: Annotated[Path, typer.Option("--data", help='Text file, or JSONL of {"text"}.')],
    model: ModelOpt = DEFAULT_MODEL,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 2048,
    stride: Annotated[int, typer.Option("--stride", help="Step between windows.")] = 1024,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per batch.")] = 1,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
    fast_blas: FastBlasOpt = False,
) -> None:
    """Perplexity over a text file in sliding windows (Hugging Face's recipe)."""
    _fast_blas(fast_blas)
    from dataclasses import asdict

    from mlx_openelm.evaluate import perplexity, read_texts
    from mlx_openelm.generate import load_for_generation

    texts = read_texts(data)
    lm, tok, _ = load_for_generation(model, adapter_path=adapter, tokenizer=tokenizer)
    result = _run_with_progress(
        "windows",
        lambda cb: perplexity(lm, tok, texts, seq_len, stride, batch_size, on_progress=cb),
    )
    if as_json:
        return _print_json(asdict(result))
    out.print(f"documents     {result.documents}\nwindows       {result.windows}")
    out.print(f"tokens scored {result.tokens}\nnll / token   {result.nll:.4f}")
    out.print(f"perplexity    {result.perplexity:.4f}")


@eval_app.command("choice")
def eval_choice(
    tasks: Annotated[Path, typer.Option("--tasks", help="JSONL: context, choices, answer.")],
    model: ModelOpt = DEFAULT_MODEL,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N.")] = None,
    delimiter: Annotated[str, typer.Option("--delimiter", help="Between context/choice.")] = " ",
    max_length: Annotated[int, typer.Option("--max-length", help="Most tokens seen.")] = 2048,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
    fast_blas: FastBlasOpt = False,
) -> None:
    """Zero-shot multiple-choice accuracy (acc, acc_norm), scored like lm-eval."""
    _fast_blas(fast_blas)
    from mlx_openelm.evaluate import evaluate_choice, read_choice_tasks
    from mlx_openelm.generate import load_for_generation

    questions = read_choice_tasks(tasks)[:limit]
    lm, tok, _ = load_for_generation(model, adapter_path=adapter, tokenizer=tokenizer)
    r = _run_with_progress(
        "questions",
        lambda cb: evaluate_choice(lm, tok, questions, delimiter, max_length, on_progress=cb),
    )
    summary = {k: getattr(r, k) for k in ("questions", "acc", "acc_stderr", "acc_norm")}
    if as_json:
        return _print_json({**summary, "acc_norm_stderr": r.acc_norm_stderr})
    out.print(f"questions {r.questions}")
    out.print(f"acc       {r.acc:.4f} ± {r.acc_stderr:.4f}")
    out.print(f"acc_norm  {r.acc_norm:.4f} ± {r.acc_norm_stderr:.4f}")


@app.command("bench")
def bench_command(
    model: ModelOpt = DEFAULT_MODEL,
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", "-p", help="Random prompt length.")
    ] = 512,
    generation_tokens: Annotated[
        int, typer.Option("--generation-tokens", "-g", help="Tokens to generate.")
    ] = 128,
    trials: Annotated[int, typer.Option("--num-trials", "-n", help="Timed runs.")] = 3,
    compare_mlx_lm: Annotated[
        bool, typer.Option("--compare-mlx-lm", help="Also time mlx-lm on the same folder.")
    ] = False,
    seed: SeedOpt = None,
    as_json: JsonOpt = False,
    fast_blas: FastBlasOpt = False,
) -> None:
    """Prompt and generation speed on a random prompt, peak memory, and the decode limit."""
    _fast_blas(fast_blas)
    from mlx_openelm.bench import bench, format_bench

    report = bench(model, prompt_tokens, generation_tokens, trials, compare_mlx_lm, seed=seed or 0)
    if as_json:
        return _print_json(report.to_dict())
    out.print(format_bench(report), markup=False)


@app.command()
def doctor(as_json: JsonOpt = False, fast_blas: FastBlasOpt = False) -> None:
    """Versions, backend, memory and (Linux CPU) which BLAS MLX uses: paste it into bug reports."""
    _fast_blas(fast_blas)
    from mlx_openelm.doctor import format_report, report

    r = report()
    if as_json:
        return _print_json(r)
    out.print(format_report(r), markup=False)


# === serve (server issue) ===


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mlx-openelm")


if __name__ == "__main__":
    sys.exit(main())
