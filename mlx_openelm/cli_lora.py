"""The fine-tuning commands: ``lora``, ``fuse``, ``export-peft``, ``import-peft``, ``plot``.

Registered on the app in ``cli.py``; the training defaults come from ``TrainConfig`` and
``AdapterSpec``, so the flags and the library share one set.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlx_openelm.choices import FineTuneType, LRSchedule, OptimizerName
from mlx_openelm.cli_common import (
    DEFAULT_MODEL,
    FastBlasOpt,
    ForceOpt,
    LazyProgress,
    ModelOpt,
    SeedOpt,
    TokenizerOpt,
    apply_fast_blas,
    err,
    out,
)
from mlx_openelm.lora.config import AdapterSpec, TrainConfig  # no MLX import

if TYPE_CHECKING:
    from rich.progress import Progress

_SPEC, _TRAIN = AdapterSpec(), TrainConfig()  # the one place the fine-tuning defaults live


def _lora_reporter(progress: Progress) -> Callable[[object], None]:
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


def _read_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """``--config FILE``: a YAML mapping of ``lora`` flags used as their defaults.

    Keys are the flag names (``batch_size: 2`` or ``batch-size: 2``; ``targets`` may be a list);
    flags given on the command line win, as with mlx-lm's ``--config``.
    """
    if value is None:
        return None
    from mlx_openelm.errors import ConfigError
    from mlx_openelm.jsonio import read_yaml

    data = read_yaml(value, ConfigError, "fix the --config file")
    if not isinstance(data, dict):
        raise ConfigError(f"--config {value}: expected a mapping of flag names to values")
    flags = {p.name for p in ctx.command.params} - {param.name}
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(k for k in values if k not in flags)
    if unknown:
        raise ConfigError(
            f"--config {value}: unknown key(s) {', '.join(unknown)}; the keys are lora's flags "
            "(see mlx-openelm lora --help), e.g. batch_size, learning_rate"
        )
    if isinstance(values.get("targets"), list):
        values["targets"] = ",".join(map(str, values["targets"]))
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


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
        bool, typer.Option("--keep-best", help="Keep the adapters with the lowest validation loss.")
    ] = False,
    early_stop: Annotated[
        int | None, typer.Option("--early-stop", help="Stop after N validations w/o gain.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the checkpoint in ADAPTER_PATH; a constant schedule may raise "
            "--iters.",
        ),
    ] = False,
    test: Annotated[bool, typer.Option("--test", help="Evaluate test.jsonl at the end.")] = False,
    plot: Annotated[bool, typer.Option("--plot", help="Write loss.png at the end.")] = False,
    tokenizer: TokenizerOpt = None,
    force: ForceOpt = False,
    fast_blas: FastBlasOpt = False,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML file of flag: value defaults (e.g. batch_size: 2); flags given win.",
            is_eager=True,
            callback=_read_config,
        ),
    ] = None,
) -> None:
    """LoRA / DoRA / full fine-tuning on JSONL data (text, prompt/completion or chat messages).

    Writes ADAPTER_PATH/adapters.safetensors + adapter_config.json (mlx-lm's layout, so
    `mlx_lm.generate --adapter-path` takes it too), metrics.jsonl and checkpoint/.
    Data-parallel: `mlx.launch -n 2 -- mlx-openelm lora ...`.
    """
    apply_fast_blas(fast_blas)
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn

    from mlx_openelm.lora import finetune

    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    spec = AdapterSpec(
        fine_tune_type=fine_tune_type.value, rank=rank, alpha=alpha, dropout=dropout,
        targets=names, num_layers=num_layers,
    )  # fmt: skip
    config = TrainConfig(
        iters=iters, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
        learning_rate=learning_rate, lr_schedule=lr_schedule.value, warmup=warmup,
        optimizer=optimizer.value, weight_decay=weight_decay, grad_clip=grad_clip,
        grad_checkpoint=grad_checkpoint, seed=_TRAIN.seed if seed is None else seed,
        max_seq_len=max_seq_len, pack=pack, pack_length=pack_length, val_every=val_every,
        val_batches=val_batches, save_every=save_every, keep_best=keep_best,
        early_stop=early_stop,
    )  # fmt: skip
    columns = ("[bold]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn(), "{task.fields[stats]}")  # fmt: skip
    with LazyProgress(*columns, console=err) as progress:
        result = finetune(
            model, adapter_path, data=data, train_file=train, valid_file=valid, spec=spec,
            config=config, mask_prompt=mask_prompt, test=test, plot=plot, tokenizer=tokenizer,
            resume=resume, force=force, callback=_lora_reporter(progress),
        )  # fmt: skip
    if result.extra.get("rank", 0):
        return  # data-parallel: rank 0 reports
    best = ""
    if result.best_val_loss is not None and result.best_step is not None:
        best = f", best validation loss {result.best_val_loss:.4f} at step {result.best_step}"
    out.print(
        f"Trained {result.steps} steps ({result.tokens_per_second:,.0f} tok/s, "
        f"{result.peak_memory_gb:.2f} GB peak){best}; adapters in {result.adapter_path}"
    )
    if "plot" in result.extra:
        out.print(f"Loss curve: {result.extra['plot']}")


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


def import_peft(
    peft: Annotated[Path, typer.Argument(help="PEFT LoRA folder (adapter_model.safetensors).")],
    output: Annotated[Path, typer.Argument(help="Adapter folder to write (mlx-lm layout).")],
    model: ModelOpt = DEFAULT_MODEL,
    force: ForceOpt = False,
) -> None:
    """Convert Hugging Face PEFT LoRA adapters for MODEL into an mlx-lm adapter folder."""
    from mlx_openelm.lora import import_peft as do_import

    out.print(f"Wrote adapters to {do_import(peft, model, output, force=force)}")


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
