"""The ``mlx-openelm`` command line: thin Typer commands over library functions.

Every command parses its options, calls one library function and prints. Library errors
(``OpenELMError``) become one red line and exit code 1; ``--debug`` shows the traceback instead.
Shared options are defined once as ``Annotated`` aliases in ``mlx_openelm/cli_common.py``; the
commands with many options live beside it (``cli_convert``, ``cli_generate``, ``cli_lora``) and are
registered on the app here.

This file lives at the repository root and is installed as ``mlx_openelm.cli`` (through the
``mlx_openelm/cli.py`` symlink; see the README's development notes).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

from mlx_openelm import (
    __version__,
    cli_convert,
    cli_export,
    cli_generate,
    cli_lm_eval,
    cli_lora,
)
from mlx_openelm.cli_common import (
    DEFAULT_MODEL,
    AdapterOpt,
    FastBlasOpt,
    FrequencyOpt,
    JsonOpt,
    LazyProgress,
    MaxTokensOpt,
    ModelOpt,
    PresenceOpt,
    PromptLookupOpt,
    RepPenaltyOpt,
    RepScopeOpt,
    SeedOpt,
    TempOpt,
    TokenizerOpt,
    TopPOpt,
    apply_fast_blas,
    err,
    out,
)
from mlx_openelm.errors import OpenELMError, OpenELMWarning, short
from mlx_openelm.outputs import DISK_FULL, disk_full_error

_state = {"debug": False}
MAX_ERROR_CHARS = 2000  # an error line quoting a huge value keeps its head (what) and tail (how)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Library warnings (``OpenELMWarning``) as one yellow line; others as Python prints them."""
    if issubclass(category, OpenELMWarning):
        err.print(f"[yellow]Warning:[/] {escape(short(message, MAX_ERROR_CHARS))}")
    else:
        err.print(warnings.formatwarning(message, category, filename, lineno, line), end="")


class _Group(TyperGroup):
    """Maps every user-fixable error to one red line and exit 1 (a single CLIError path)."""

    def invoke(self, ctx: click.Context):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", OpenELMWarning)
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except (OpenELMError, OSError) as e:
            if _state["debug"] or not isinstance(e, OpenELMError) and e.errno not in DISK_FULL:
                raise
            if not isinstance(e, OpenELMError):  # a save outside the folder writer
                e = disk_full_error(e, e.filename or ".")
            err.print(f"[bold red]Error:[/] {escape(short(e, MAX_ERROR_CHARS))}")
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
        "quantized",
        "runs_as",
        "chat_template",
    ):
        out.print(f"  {key:<14} {desc[key]}")
    out.print(f"  {'q heads':<14} {desc['num_query_heads']}")
    out.print(f"  {'kv heads':<14} {desc['num_kv_heads']}")
    out.print(f"  {'ffn widths':<14} {desc['ffn_dims']}")


# Commands with many options live in their own modules; registered here in --help order.
app.command()(cli_convert.convert)
app.command()(cli_generate.generate)
app.command()(cli_generate.chat)
app.command()(cli_lora.lora)
app.command()(cli_lora.fuse)
app.command("export-peft")(cli_lora.export_peft)
app.command("import-peft")(cli_lora.import_peft)
app.command("plot")(cli_lora.plot_cmd)
app.command("export-gguf")(cli_export.export_gguf)  # GGUF export issue


# === eval / bench / doctor ===
eval_app = typer.Typer(
    cls=TyperGroup,
    help="Measure model quality: perplexity, multiple choice, lm-evaluation-harness tasks.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")


def _progress_bar(what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn

    return LazyProgress(
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
        task: list[int] = []  # added on the first report: input errors print with no bar

        def update(done: int, total: int | None) -> None:
            if not task:
                task.append(bar.add_task(what, total=total))
            bar.update(task[0], completed=done, total=total)

        return work(update)


def _print_json(data) -> None:
    import json

    out.print(json.dumps(data, indent=2), markup=False)


@eval_app.command("perplexity")
def eval_perplexity(
    data: Annotated[Path, typer.Option("--data", help='Text file, or JSONL of {"text"}.')],
    model: ModelOpt = DEFAULT_MODEL,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 2048,
    stride: Annotated[
        int | None, typer.Option("--stride", help="Step between windows (default: seq-len/2).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per batch.")] = 1,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
    fast_blas: FastBlasOpt = False,
) -> None:
    """Perplexity over a text file in sliding windows (Hugging Face's recipe)."""
    apply_fast_blas(fast_blas)
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
    ppl = result.perplexity
    out.print(f"perplexity    {ppl:.4f}" if ppl < 1e6 else f"perplexity    {ppl:.4e}")
    if getattr(lm, "execution", None) is not None and lm.execution.quantization:
        out.print(f"weights       {lm.execution.describe()}")


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
    apply_fast_blas(fast_blas)
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


eval_app.command("lm-eval")(cli_lm_eval.lm_eval_cmd)


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
    compare_llama_cpp: Annotated[
        bool,
        typer.Option("--compare-llama-cpp", help="Also time llama.cpp on it, exported to GGUF."),
    ] = False,
    seed: SeedOpt = None,
    as_json: JsonOpt = False,
    fast_blas: FastBlasOpt = False,
) -> None:
    """Prompt and generation speed on a random prompt, peak memory, and the decode limit."""
    apply_fast_blas(fast_blas)
    from mlx_openelm.bench import bench, format_bench

    report = bench(
        model, prompt_tokens, generation_tokens, trials, compare_mlx_lm, seed=seed or 0,
        compare_llama_cpp=compare_llama_cpp,
    )  # fmt: skip
    if as_json:
        return _print_json(report.to_dict())
    out.print(format_bench(report), markup=False)


@app.command()
def doctor(as_json: JsonOpt = False, fast_blas: FastBlasOpt = False) -> None:
    """Versions, backend, memory and (Linux CPU) which BLAS MLX uses: paste it into bug reports."""
    apply_fast_blas(fast_blas)
    from mlx_openelm.doctor import format_report, report

    r = report()
    if as_json:
        return _print_json(r)
    out.print(format_report(r), markup=False)


# === serve ===
from mlx_openelm.serve.schema import (  # noqa: E402 (stdlib only: no MLX, no server stack)
    DEFAULT_HOST,
    DEFAULT_PORT,
    ServerSettings,
)

_SERVE = ServerSettings()  # the one place the server's defaults live


@app.command()
def serve(
    ctx: typer.Context,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="MLX_OPENELM_API_KEY",
            help="Require 'Authorization: Bearer KEY' (all routes but /health).",
        ),
    ] = None,
    max_tokens: MaxTokensOpt = _SERVE.generation.max_tokens,
    temp: TempOpt = _SERVE.generation.temp,
    top_p: TopPOpt = _SERVE.generation.top_p,
    repetition_penalty: RepPenaltyOpt = None,
    repetition_scope: RepScopeOpt = None,
    presence_penalty: PresenceOpt = 0.0,
    frequency_penalty: FrequencyOpt = 0.0,
    prompt_lookup_num_tokens: PromptLookupOpt = None,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests that may wait; more get HTTP 429.")
    ] = _SERVE.max_queue,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Requests decoded together (continuous batching).")
    ] = _SERVE.max_batch,
    cache_bytes: Annotated[
        int, typer.Option("--cache-bytes", help="Bytes of prompt-prefix KV caches kept (LRU).")
    ] = _SERVE.cache_bytes,
    prompt_cache_file: Annotated[
        Path | None,
        typer.Option(
            "--prompt-cache-file",
            help="A system prompt's KV cache kept on disk (mlx-lm's format): loaded at start, "
            "built from --cache-system-prompt and saved when missing.",
        ),
    ] = None,
    cache_system_prompt: Annotated[
        str | None, typer.Option("--cache-system-prompt", help="The system prompt it holds.")
    ] = None,
    allowed_origins: Annotated[
        list[str] | None,
        typer.Option("--allowed-origins", help="Browser origins allowed (CORS; '*': any)."),
    ] = None,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions) locally.

    The generation flags apply to requests that do not set them. Instruct models get Apple's
    decoding unless set: --repetition-penalty 1.2 over the whole context, --prompt-lookup 10
    (the model's generation_config.json fields come first).
    """
    import logging

    flags = dict(locals())
    generation = cli_generate.options_from_flags(flags)
    explicit = cli_generate.explicit_flags(ctx, flags)
    settings = ServerSettings(
        api_key=api_key, generation=generation, max_queue=max_queue, explicit=explicit,
        max_batch=max_batch, cache_bytes=cache_bytes, allowed_origins=tuple(allowed_origins or ()),
        prompt_cache_file=str(prompt_cache_file) if prompt_cache_file else None,
        cache_system_prompt=cache_system_prompt,
    )  # fmt: skip
    settings.check()  # before anything loads
    from mlx_openelm.server import serve as run_server  # ServeError when the extra is missing

    def ready(url: str, model_id: str) -> None:
        err.print(f"Serving [bold]{model_id}[/] at [bold]{url}[/]  (Ctrl-C stops)")
        if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
            err.print(f"[yellow]Warning:[/] {host} is reachable from other machines; add --api-key")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    run_server(
        model, adapter_path=adapter, tokenizer=tokenizer, host=host, port=port,
        settings=settings, on_ready=ready,
    )  # fmt: skip


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mlx-openelm")


if __name__ == "__main__":
    sys.exit(main())
