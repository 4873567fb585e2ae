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
from rich.markup import escape
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
            err.print(f"[bold red]Error:[/] {escape(str(e))}")
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


class SourceFormat(str, Enum):
    hf = "hf"
    corenet = "corenet"


class CoreNetSize(str, Enum):
    s270M = "270M"
    s450M = "450M"
    s1_1B = "1_1B"
    s3B = "3B"


class Bits(str, Enum):
    b2 = "2"
    b3 = "3"
    b4 = "4"
    b6 = "6"
    b8 = "8"


class GroupSize(str, Enum):
    g32 = "32"
    g64 = "64"
    g128 = "128"


class MixedPreset(str, Enum):
    mixed_2_6 = "mixed_2_6"
    mixed_3_4 = "mixed_3_4"
    mixed_3_6 = "mixed_3_6"
    mixed_4_6 = "mixed_4_6"


class ChatTemplate(str, Enum):
    auto = "auto"
    zephyr = "zephyr"
    none = "none"


_MIXED_HELP = (
    "Mixed-precision preset mixed_L_H (implies -q): H bits for the tied embedding / output head "
    "and for qkv_proj and proj_2 in the first and last eighth of the layers and every third layer "
    "between; L bits elsewhere."
)


def _progress_reporter(progress):  # noqa: ANN001, ANN202 - rich Progress -> callback
    tasks: dict[str, int] = {}

    def report(p) -> None:  # noqa: ANN001 - mlx_openelm.convert.ConvertProgress
        if p.phase not in tasks:
            tasks[p.phase] = progress.add_task(p.phase, total=p.bytes_total, count="")
        count = f"{p.tensors_done}/{p.tensors_total} tensors"
        progress.update(tasks[p.phase], completed=p.bytes_done, count=count)

    return report


def _convert_summary(result) -> list[str]:  # noqa: ANN001 - mlx_openelm.convert.ConvertResult
    quant = ""
    if result.quantization:
        q = result.quantization
        mixed = any(isinstance(v, dict) for v in q.values())
        kind = f"mixed {q['bits']}-bit+" if mixed else f"{q['bits']}-bit"
        quant = f", {kind} g{q['group_size']} ({result.bits_per_weight:.2f} bits/weight)"
    lines = [
        f"Wrote {result.path}: {result.parameters / 1e6:.1f}M parameters, "
        f"{result.size_bytes / 1e6:.1f} MB on disk, {result.seconds:.1f} s ({result.dtype}{quant})"
    ]
    if result.quality is not None:
        r = result.quality
        change = (r.ppl_quantized / r.ppl_reference - 1) * 100
        lines.append(
            f"Quantization cost on a {r.tokens}-token probe: KL {r.kl_mean:.4f} nats/token "
            f"(max {r.kl_max:.3f}), perplexity {r.ppl_reference:.3g} -> {r.ppl_quantized:.3g} "
            f"({change:+.1f}%), top-1 agreement {r.top1_agreement:.1%}"
        )
    return lines


@app.command()
def convert(
    sources: Annotated[
        list[str],
        typer.Argument(help="Hub repo id, HF folder or CoreNet .pt (several with --average)."),
    ],
    output: Annotated[Path, typer.Argument(help="MLX model folder to create.")],
    source_format: Annotated[
        SourceFormat | None, typer.Option("--from", help="Source format; default: detect.")
    ] = None,
    config_yaml: Annotated[
        Path | None, typer.Option("--config-yaml", help="CoreNet training YAML of the .pt.")
    ] = None,
    size: Annotated[
        CoreNetSize | None, typer.Option("--size", help="CoreNet model size (no YAML).")
    ] = None,
    average: Annotated[
        bool, typer.Option("--average", help="Average the SOURCES (uniform mean in float32).")
    ] = False,
    dtype: DTypeOpt = None,
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="Quantize weights.")] = False,
    bits: Annotated[Bits, typer.Option("--bits", help="Bits per quantized weight.")] = Bits.b4,
    group_size: Annotated[
        GroupSize, typer.Option("--group-size", help="Weights per quantization scale.")
    ] = GroupSize.g64,
    mixed: Annotated[MixedPreset | None, typer.Option("--mixed", help=_MIXED_HELP)] = None,
    quality: Annotated[
        bool | None,
        typer.Option("--quality/--no-quality", help="After -q: measure the KL cost (GPU: on)."),
    ] = None,
    tokenizer: TokenizerOpt = None,
    chat_template: Annotated[
        ChatTemplate, typer.Option("--chat-template", help="auto: Zephyr for -Instruct models.")
    ] = ChatTemplate.auto,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a checkpoint (hub repo, HF folder, CoreNet .pt) into an MLX model folder.

    Default dtype float16 (bfloat16 for 3B). OUTPUT appears only when everything succeeded.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    from mlx_openelm.convert import convert as convert_checkpoint
    from mlx_openelm.errors import ConfigError

    if len(sources) > 1 and not average:
        raise ConfigError(f"{len(sources)} sources given; pass --average to average them")
    if average and len(sources) < 2:
        raise ConfigError("--average needs at least two checkpoints to average")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    extra = (TextColumn("{task.fields[count]}"), TimeElapsedColumn())
    with Progress(*columns, *extra, console=err, transient=True) as progress:
        result = convert_checkpoint(
            sources if average else sources[0],
            output,
            source_format=source_format.value if source_format else None,
            config_yaml=config_yaml,
            size=size.value if size else None,
            dtype=dtype.value if dtype else None,
            quantize=quantize,
            bits=int(bits.value),
            group_size=int(group_size.value),
            mixed=mixed.value if mixed else None,
            tokenizer=tokenizer,
            chat_template=chat_template.value,
            quality=quality,
            force=force,
            revision=revision,
            on_progress=_progress_reporter(progress),
        )
    if as_json:
        import dataclasses
        import json

        out.print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
        return
    for line in _convert_summary(result):
        out.print(line)
    if result.quantization and result.quality is None and quality is None:
        out.print("Quality probe skipped on CPU (slow there); pass --quality to run it.")


# === generate / chat (generation issue) ===
from mlx_openelm.generate import (  # noqa: E402 - beside the commands that use them
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_P,
    DEFAULT_NUM_DRAFT,
    DEFAULT_REPETITION_CONTEXT,
    DEFAULT_TEMP,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
)

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
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    temp: TempOpt = DEFAULT_TEMP,
    top_p: TopPOpt = DEFAULT_TOP_P,
    top_k: TopKOpt = DEFAULT_TOP_K,
    min_p: MinPOpt = DEFAULT_MIN_P,
    repetition_penalty: RepPenaltyOpt = None,
    repetition_context_size: RepContextOpt = DEFAULT_REPETITION_CONTEXT,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    draft_model: DraftOpt = None,
    num_draft: NumDraftOpt = DEFAULT_NUM_DRAFT,
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
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    temp: TempOpt = DEFAULT_TEMP,
    top_p: TopPOpt = DEFAULT_TOP_P,
    top_k: TopKOpt = DEFAULT_TOP_K,
    min_p: MinPOpt = DEFAULT_MIN_P,
    repetition_penalty: RepPenaltyOpt = None,
    repetition_context_size: RepContextOpt = DEFAULT_REPETITION_CONTEXT,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    draft_model: DraftOpt = None,
    num_draft: NumDraftOpt = DEFAULT_NUM_DRAFT,
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

from mlx_openelm.lora.config import AdapterSpec, TrainConfig  # noqa: E402 (no MLX import)

_SPEC, _TRAIN = AdapterSpec(), TrainConfig()  # the one place the fine-tuning defaults live


class FineTuneType(str, Enum):
    lora = "lora"
    dora = "dora"
    full = "full"


class LRSchedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class OptimizerName(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"


def _lora_reporter(progress):  # noqa: ANN001, ANN202 - rich Progress -> training callback
    from mlx_openelm.lora import DataReport, EvalReport, SaveReport, StartReport, StepReport

    task: list[int] = []
    data: list[DataReport] = []  # printed once training starts: errors stay one line

    def report(event: object) -> None:
        if isinstance(event, DataReport):
            data.append(event)
        elif isinstance(event, StartReport):
            for split, s in data[0].splits.items() if data else ():
                progress.console.print(
                    f"{split:<5} {s['examples']} examples ({s['format']}), {s['tokens']} tokens, "
                    f"{s['trained_tokens']} trained; {s['truncated']} truncated, "
                    f"{s['dropped']} dropped"
                )
            rows = f"{event.rows} rows" + (
                f" packed to {event.row_length} tokens" if event.row_length else ""
            )
            progress.console.print(
                f"{event.trainable_parameters / 1e6:.3f}M trainable parameters, {rows}, "
                f"{event.steps_per_epoch} steps per epoch, {event.world_size} process(es)"
            )
            task.append(
                progress.add_task(
                    "train", total=event.total_steps, completed=event.start_step, stats=""
                )
            )
        elif isinstance(event, StepReport):
            stats = (
                f"loss {event.loss:.3f}  lr {event.learning_rate:.2e}  "
                f"{event.tokens_per_second:,.0f} tok/s  {event.peak_memory_gb:.2f} GB peak"
            )
            progress.update(task[0], completed=event.step, stats=stats)
        elif isinstance(event, EvalReport):
            star = " (best)" if event.best else ""
            progress.console.print(
                f"step {event.step}: {event.split} loss {event.loss:.4f}, "
                f"ppl {event.perplexity:.4g}{star}"
            )
        elif isinstance(event, SaveReport) and event.kind != "final":
            progress.console.print(f"step {event.step}: saved {event.kind} → {event.path}")

    return report


@app.command()
def lora(
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[
        Path | None, typer.Option("--data", help="Folder: train.jsonl (+ valid.jsonl, test.jsonl).")
    ] = None,
    train: Annotated[Path | None, typer.Option("--train", help="Training JSONL file.")] = None,
    valid: Annotated[Path | None, typer.Option("--valid", help="Validation JSONL file.")] = None,
    adapter_path: Annotated[
        Path, typer.Option("--adapter-path", "-o", help="Output adapter folder.")
    ] = Path("adapters"),
    fine_tune_type: Annotated[FineTuneType, typer.Option("--fine-tune-type")] = FineTuneType(
        _SPEC.fine_tune_type
    ),
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = _SPEC.rank,
    alpha: Annotated[
        float, typer.Option("--alpha", help="LoRA alpha; the update is scaled by alpha/rank.")
    ] = _SPEC.alpha,
    dropout: Annotated[
        float, typer.Option("--dropout", help="LoRA input dropout.")
    ] = _SPEC.dropout,
    targets: Annotated[
        str, typer.Option("--targets", help="Comma-separated linear layers to adapt.")
    ] = ",".join(_SPEC.targets),
    num_layers: Annotated[
        int, typer.Option("--num-layers", help="Adapt the last N layers; -1 = all.")
    ] = _SPEC.num_layers,
    iters: Annotated[
        int | None, typer.Option("--iters", help="Optimizer steps (1000 unless --epochs).")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the data.")] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Sequences per step (packed rows).")
    ] = _TRAIN.batch_size,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", help="Batches per step.")
    ] = _TRAIN.grad_accum,
    learning_rate: Annotated[float, typer.Option("--learning-rate", "--lr")] = _TRAIN.learning_rate,
    lr_schedule: Annotated[LRSchedule, typer.Option("--lr-schedule")] = LRSchedule(
        _TRAIN.lr_schedule
    ),
    warmup: Annotated[int, typer.Option("--warmup", help="Linear warmup steps.")] = _TRAIN.warmup,
    optimizer: Annotated[OptimizerName, typer.Option("--optimizer")] = OptimizerName(
        _TRAIN.optimizer
    ),
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = _TRAIN.weight_decay,
    grad_clip: Annotated[
        float | None, typer.Option("--grad-clip", help="Clip the gradient norm.")
    ] = None,
    grad_checkpoint: Annotated[
        bool, typer.Option("--grad-checkpoint", help="Recompute activations: less memory.")
    ] = False,
    seed: SeedOpt = None,
    max_seq_len: Annotated[
        int, typer.Option("--max-seq-len", help="Truncate longer examples to this many tokens.")
    ] = _TRAIN.max_seq_len,
    pack_length: Annotated[
        int | None,
        typer.Option(
            "--pack-length",
            help="Packed row length in tokens (default: the longest example, rounded up to 32).",
            show_default=False,
        ),
    ] = None,
    pack: Annotated[
        bool | None,
        typer.Option("--pack/--no-pack", help="Pack examples into rows (default: on for text)."),
    ] = None,
    mask_prompt: Annotated[
        bool, typer.Option("--mask-prompt", help="Train on completions / assistant turns only.")
    ] = False,
    val_every: Annotated[
        int, typer.Option("--val-every", help="Validate every N steps.")
    ] = _TRAIN.val_every,
    val_batches: Annotated[
        int, typer.Option("--val-batches", help="Validation batches; -1 = all.")
    ] = _TRAIN.val_batches,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Checkpoint every N steps.")
    ] = _TRAIN.save_every,
    keep_best: Annotated[
        bool, typer.Option("--keep-best", help="Keep the lowest-validation-loss adapters.")
    ] = False,
    early_stop: Annotated[
        int | None, typer.Option("--early-stop", help="Stop after N validations w/o gain.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from ADAPTER_PATH/checkpoint.")
    ] = False,
    test: Annotated[bool, typer.Option("--test", help="Evaluate test.jsonl at the end.")] = False,
    plot: Annotated[bool, typer.Option("--plot", help="Write loss.png at the end.")] = False,
    tokenizer: TokenizerOpt = None,
    force: ForceOpt = False,
    fast_blas: FastBlasOpt = False,
) -> None:
    """LoRA / DoRA / full fine-tuning on JSONL data (text, prompt/completion or chat messages).

    Writes ADAPTER_PATH/adapters.safetensors + adapter_config.json (mlx-lm's layout, so
    `mlx_lm.generate --adapter-path` takes it too), metrics.jsonl and checkpoint/.
    Data-parallel: `mlx.launch -n 2 -- mlx-openelm lora ...`.
    """
    _fast_blas(fast_blas)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from mlx_openelm.lora import finetune

    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    spec = AdapterSpec(fine_tune_type.value, rank, alpha, dropout, names, num_layers)
    config = TrainConfig(
        iters, epochs, batch_size, grad_accum, learning_rate, lr_schedule.value, warmup,
        optimizer.value, weight_decay, grad_clip, grad_checkpoint,
        _TRAIN.seed if seed is None else seed, max_seq_len, pack, pack_length,
        val_every, val_batches, save_every, keep_best, early_stop,
    )  # fmt: skip
    columns = ("[bold]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn(), "{task.fields[stats]}")  # fmt: skip
    with Progress(*columns, console=err) as progress:
        result = finetune(
            model, adapter_path, data=data, train_file=train, valid_file=valid, spec=spec,
            config=config, mask_prompt=mask_prompt, test=test, plot=plot, tokenizer=tokenizer,
            resume=resume, force=force, callback=_lora_reporter(progress),
        )  # fmt: skip
    if result.extra.get("rank", 0):
        return  # data-parallel: rank 0 reports
    best = f", best validation loss {result.best_val_loss:.4f} at step {result.best_step}"
    out.print(
        f"Trained {result.steps} steps ({result.tokens_per_second:,.0f} tok/s, "
        f"{result.peak_memory_gb:.2f} GB peak){best if result.best_step is not None else ''}"
        f"; adapters in {result.adapter_path}"
    )
    if "plot" in result.extra:
        out.print(f"Loss curve: {result.extra['plot']}")


@app.command()
def fuse(
    model: ModelOpt = DEFAULT_MODEL,
    adapter: Annotated[Path, typer.Option("--adapter", help="Adapter folder to merge.")] = Path(
        "adapters"
    ),
    output: Annotated[Path, typer.Option("--output", "-o", help="New model folder.")] = Path(
        "fused_model"
    ),
    dequantize: Annotated[
        bool, typer.Option("--dequantize", help="Write float weights (exact merge).")
    ] = False,
    force: ForceOpt = False,
) -> None:
    """Merge adapters into the base weights: a plain model folder (no adapter needed)."""
    from mlx_openelm.lora import fuse as fuse_adapters

    result = fuse_adapters(model, adapter, output, dequantize=dequantize, force=force)
    if result.warning:
        err.print(f"[yellow]Warning:[/] {result.warning}")
    out.print(
        f"Fused {result.fused_layers} {result.fine_tune_type} layer(s) into {result.path} "
        f"({result.total_size / 1e6:.1f} MB{', quantized' if result.quantized else ''})"
    )


@app.command("export-peft")
def export_peft(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder (mlx-lm layout).")],
    output: Annotated[Path, typer.Argument(help="PEFT folder to write.")],
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="base_model_name_or_path to record.")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Convert LoRA/DoRA adapters to Hugging Face PEFT format."""
    from mlx_openelm.lora import export_peft as export

    out.print(f"Wrote PEFT adapters to {export(adapter, output, base_model, force=force)}")


@app.command("import-peft")
def import_peft(
    peft: Annotated[Path, typer.Argument(help="PEFT LoRA folder (adapter_model.safetensors).")],
    output: Annotated[Path, typer.Argument(help="Adapter folder to write (mlx-lm layout).")],
    model: ModelOpt = DEFAULT_MODEL,
    force: ForceOpt = False,
) -> None:
    """Convert Hugging Face PEFT LoRA adapters for MODEL into an mlx-lm adapter folder."""
    from mlx_openelm.lora import import_peft as do_import

    out.print(f"Wrote adapters to {do_import(peft, model, output, force=force)}")


@app.command("plot")
def plot_cmd(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder (or its metrics.jsonl).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="PNG file (default ADAPTER/loss.png).")
    ] = None,
) -> None:
    """Draw the train / validation loss curve of a run as a PNG."""
    from mlx_openelm.lora import plot_metrics

    folder = adapter if adapter.is_dir() else adapter.parent
    out.print(f"Wrote {plot_metrics(adapter, output or folder / 'loss.png')}")


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
from mlx_openelm.server_schema import (  # noqa: E402 (stdlib only: no MLX, no server stack)
    DEFAULT_HOST,
    DEFAULT_PORT,
    ServerSettings,
)

_SERVE = ServerSettings()  # the one place the server's defaults live


@app.command()
def serve(
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
    max_tokens: MaxTokensOpt = _SERVE.max_tokens,
    temp: TempOpt = _SERVE.temp,
    top_p: TopPOpt = _SERVE.top_p,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests that may wait; more get HTTP 429.")
    ] = _SERVE.max_queue,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions) locally.

    --max-tokens, --temp and --top-p apply to requests that do not set them.
    """
    import logging

    settings = ServerSettings(
        api_key=api_key, max_tokens=max_tokens, temp=temp, top_p=top_p, max_queue=max_queue
    )
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
