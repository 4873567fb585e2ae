"""The ``convert`` command (registered on the app in ``cli.py``): options, progress, summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlx_openelm.choices import (
    Bits,
    ChatTemplate,
    CoreNetSize,
    GroupSize,
    MixedPreset,
    QuantMethod,
    SourceFormat,
)
from mlx_openelm.cli_common import (
    DTypeOpt,
    ForceOpt,
    JsonOpt,
    LazyProgress,
    TokenizerOpt,
    err,
    out,
)

if TYPE_CHECKING:  # annotations only: the converter imports MLX
    from rich.progress import Progress

    from mlx_openelm.convert import ConvertProgress, ConvertResult


_MIXED_HELP = (
    "Mixed-precision preset mixed_L_H (implies -q): H bits for the tied embedding / output head "
    "and for qkv_proj and proj_2 in the first and last eighth of the layers and every third layer "
    "between; L bits elsewhere."
)


_METHOD_HELP = (
    "rtn: round to nearest (streamed). Learned, on the float model in memory, with "
    "--calibration: gptq, awq, dwq (distils scales), dynamic (bits by sensitivity)."
)
MethodOpt = Annotated[QuantMethod, typer.Option("--method", help=_METHOD_HELP)]
CalibrationOpt = Annotated[
    Path | None,
    typer.Option("--calibration", help="Text or JSONL for learned methods and the probe."),
]
SamplesOpt = Annotated[
    int, typer.Option("--calibration-samples", help="256-token windows learned methods use.")
]
BpwOpt = Annotated[
    float | None,
    typer.Option("--bits-per-weight", help="dynamic: average bits (scales included), e.g. 4.5."),
]
EmbeddingOpt = Annotated[
    bool,
    typer.Option(
        "--quantize-embedding/--no-quantize-embedding",
        help="Quantize the tied embedding / output head (off: float, for other loaders).",
    ),
]


def _progress_reporter(progress: Progress) -> Callable[[ConvertProgress], None]:
    tasks: dict[str, int] = {}

    def report(p: ConvertProgress) -> None:
        if p.phase not in tasks:
            tasks[p.phase] = progress.add_task(p.phase, total=p.bytes_total, count="")
        count = f"{p.tensors_done}/{p.tensors_total} tensors"
        progress.update(tasks[p.phase], completed=p.bytes_done, count=count)

    return report


def _convert_summary(result: ConvertResult) -> list[str]:
    quant = ""
    if result.quantization:
        q = result.quantization
        mixed = any(isinstance(v, dict) for v in q.values())
        kind = f"mixed {q['bits']}-bit+" if mixed else f"{q['bits']}-bit"
        how = "" if result.method in (None, "rtn") else f" {result.method}"
        quant = f", {kind}{how} g{q['group_size']} ({result.bits_per_weight:.2f} bits/weight)"
    lines = [
        f"Wrote {result.path}: {result.parameters / 1e6:.1f}M parameters, "
        f"{result.size_bytes / 1e6:.1f} MB on disk, {result.seconds:.1f} s ({result.dtype}{quant})"
    ]
    if result.quality is not None:
        r = result.quality
        lines.append(
            f"Quantization cost on {r.tokens} tokens of {r.text}: perplexity "
            f"{r.ppl_reference:.4g} -> {r.ppl_quantized:.4g} ({r.ppl_change:+.2%}), KL "
            f"{r.kl_mean:.4f} nats/token (max {r.kl_max:.3f}), top-1 agreement "
            f"{r.top1_agreement:.1%}"
        )
    return lines


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
    method: MethodOpt = QuantMethod.rtn,
    calibration: CalibrationOpt = None,
    calibration_samples: SamplesOpt = 64,
    bits_per_weight: BpwOpt = None,
    quantize_embedding: EmbeddingOpt = True,
    quality: Annotated[
        bool | None,
        typer.Option(
            "--quality/--no-quality", help="After -q: measure the cost (default: GPU or <1B)."
        ),
    ] = None,
    tokenizer: TokenizerOpt = None,
    chat_template: Annotated[
        ChatTemplate, typer.Option("--chat-template", help="auto: Zephyr for -Instruct models.")
    ] = ChatTemplate.auto,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision.")] = None,
    force: ForceOpt = False,
    allow_nonfinite: Annotated[
        bool, typer.Option("--allow-nonfinite", help="Convert weights holding NaN/inf (warns).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a checkpoint (hub repo, HF folder, CoreNet .pt) into an MLX model folder.

    Default dtype float16 (bfloat16 for 3B). OUTPUT appears only when everything succeeded.
    """
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeElapsedColumn

    from mlx_openelm.convert import convert as convert_checkpoint
    from mlx_openelm.errors import ConfigError

    if len(sources) > 1 and not average:
        raise ConfigError(f"{len(sources)} sources given; pass --average to average them")
    if average and len(sources) < 2:
        raise ConfigError("--average needs at least two checkpoints to average")
    from mlx_openelm.convert.learned import method_note

    if (note := method_note(method.value, int(bits.value))) is not None:
        err.print(note, style="yellow")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    extra = (TextColumn("{task.fields[count]}"), TimeElapsedColumn())
    with LazyProgress(*columns, *extra, console=err, transient=True) as progress:
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
            method=method.value,
            calibration=calibration,
            calibration_samples=calibration_samples,
            bits_per_weight=bits_per_weight,
            quantize_embedding=quantize_embedding,
            tokenizer=tokenizer,
            chat_template=chat_template.value,
            quality=quality,
            force=force,
            revision=revision,
            on_progress=_progress_reporter(progress),
            allow_nonfinite=allow_nonfinite,
        )
    if as_json:
        import dataclasses
        import json

        out.print(json.dumps(dataclasses.asdict(result), indent=2, default=str))
        return
    for line in _convert_summary(result):
        out.print(line)
    if result.quantization and result.quality is None and quality is None:
        out.print("Quality probe skipped on CPU for 1B+ models (slow); pass --quality to run it.")
