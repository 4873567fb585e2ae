"""``mlx-openelm eval lm-eval``: lm-evaluation-harness tasks through our backend.

Thin: parse, call :func:`mlx_openelm.lm_eval_run.run_lm_eval`, print lm-eval's own results
table (and, with ``--preset openelm-paper``, our numbers beside Apple's published ones).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mlx_openelm.cli_common import (
    DEFAULT_MODEL,
    AdapterOpt,
    FastBlasOpt,
    JsonOpt,
    LazyProgress,
    ModelOpt,
    TokenizerOpt,
    apply_fast_blas,
    err,
    out,
)


class Preset(str, Enum):
    openelm_paper = "openelm-paper"


TasksOpt = Annotated[
    str | None, typer.Option("--tasks", help="Comma-separated lm-eval tasks/groups/YAML files.")
]
PresetOpt = Annotated[
    Preset | None, typer.Option("--preset", help="openelm-paper: the paper's zero-shot suite.")
]
FewshotOpt = Annotated[int | None, typer.Option("--num-fewshot", help="Examples per prompt.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Only N documents per task.")]
OffsetOpt = Annotated[int, typer.Option("--offset", help="Skip the first N documents.")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Write results JSON.")]
IncludeOpt = Annotated[
    Path | None, typer.Option("--include-path", help="Folder of your own task YAML files.")
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Local Hugging Face datasets cache.")
]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never reach the hub for datasets.")]
ChatOpt = Annotated[
    bool, typer.Option("--apply-chat-template", help="Prompts in the model's chat template.")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Rows per forward pass.")]
CacheOpt = Annotated[
    Path | None, typer.Option("--cache", help="lm-eval request cache path: reruns resume.")
]


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    bar = LazyProgress(
        "[bold]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def update(kind: str, done: int, total: int, tokens: int, seconds: float) -> None:
        if kind not in tasks:
            tasks[kind] = bar.add_task(kind, total=total, rate="")
        rate = f"{tokens / max(seconds, 1e-9):,.0f} tok/s"
        bar.update(tasks[kind], completed=done, total=total, rate=rate)

    return bar, update


def _print_paper(results: dict, model_args: object) -> None:
    from mlx_openelm.lm_eval_run import paper_rows, paper_table

    rows = paper_rows(results, vars(model_args))
    names = list(rows[0].paper) if rows else []
    if not names:
        out.print("No published OpenELM numbers for this model's size; ours only.")
    out.print("  ".join([f"{'task':<14}{'metric':<9}{'ours':>7}", *(f"{n:>22}" for n in names)]))
    for r in rows:
        ours = "-" if r.ours is None else f"{r.ours:.2f}"
        cells = [f"{r.task:<14}{r.metric:<9}{ours:>7}", *(f"{r.paper[n]:>22.2f}" for n in names)]
        out.print("  ".join(cells))
    out.print(f"Published: {paper_table()['source']}", markup=False)


def lm_eval_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    tasks: TasksOpt = None,
    preset: PresetOpt = None,
    num_fewshot: FewshotOpt = None,
    limit: LimitOpt = None,
    offset: OffsetOpt = 0,
    output: OutputOpt = None,
    include_path: IncludeOpt = None,
    data_dir: DataDirOpt = None,
    offline: OfflineOpt = False,
    apply_chat_template: ChatOpt = False,
    batch_size: BatchOpt = 8,
    cache: CacheOpt = None,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
    fast_blas: FastBlasOpt = False,
) -> None:
    """lm-evaluation-harness tasks (few-shot, named tasks, the OpenELM paper's suite)."""
    apply_fast_blas(fast_blas)
    import logging

    from mlx_openelm import lm_eval_run as run

    run.require_lm_eval()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes drown the table
    run.use_local_datasets(data_dir, offline)
    names = run.task_names(tasks, preset and preset.value)
    options = run.LMEvalOptions(
        names, 0 if preset else num_fewshot, limit, offset, include_path, apply_chat_template, cache
    )
    from mlx_openelm.lm_eval_backend import OpenELMLM

    bar, update = _progress()
    lm = OpenELMLM(model, adapter, tokenizer, batch_size=batch_size, on_progress=update)
    with bar:
        results = run.run_lm_eval(lm, options)
    if output is not None:
        run.write_results(output, results)
    if as_json:
        import json

        return out.print(json.dumps(results["results"], indent=2), markup=False)
    from lm_eval.utils import make_table

    out.print(make_table(results), markup=False)
    if preset:
        _print_paper(results, lm.model.args)
