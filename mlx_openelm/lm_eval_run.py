"""Run lm-evaluation-harness tasks on an OpenELM: ``mlx-openelm eval lm-eval``.

lm-eval does the task side (datasets, prompts, few-shot sampling, metrics); the model side is
:class:`mlx_openelm.lm_eval_backend.OpenELMLM`. This module adds what a user on a laptop needs
around :func:`lm_eval.simple_evaluate`: task names, datasets and few-shot counts checked first
with one actionable error each, offline runs against a local Hugging Face ``datasets`` cache or
task YAML over local JSONL (``include_path``), resumable slices (``offset``/``limit``, lm-eval's
request cache), results written atomically, and the ``openelm-paper`` preset: the zero-shot suite
of Apple's paper beside its published numbers (``data/openelm_paper_lm_eval.json``).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import DataError, OpenELMError

PAPER_PRESET = "openelm-paper"


class LMEvalMissingError(OpenELMError):
    """lm-eval (the ``[eval]`` extra) is not installed."""


def require_lm_eval() -> None:
    """Raises LMEvalMissingError (with the install command) when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise LMEvalMissingError(
            f"lm-eval is not installed ({e}); install it with: pip install 'mlx-openelm[eval]'"
        ) from e


def use_local_datasets(data_dir: str | Path | None = None, offline: bool = False) -> None:
    """Point Hugging Face ``datasets`` at a local cache and/or forbid the network.

    Call before lm-eval loads any task. ``data_dir`` becomes ``HF_DATASETS_CACHE`` (a copy of
    ``~/.cache/huggingface/datasets`` from a connected machine); ``offline`` sets
    ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` so a missing dataset fails at once instead of
    retrying the hub.

    Raises:
        DataError: ``data_dir`` is not a directory.
    """
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise DataError(f"--data-dir {data_dir} is not a directory; pass a datasets cache")
        os.environ["HF_DATASETS_CACHE"] = str(Path(data_dir).resolve())
    if offline:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import sys

    # Already imported (a long-lived process, the tests): both read these at import time.
    if "datasets" in sys.modules:
        import datasets.config as dc

        if data_dir is not None:
            dc.HF_DATASETS_CACHE = Path(os.environ["HF_DATASETS_CACHE"])
        if offline:
            dc.HF_HUB_OFFLINE = dc.HF_DATASETS_OFFLINE = True
    if offline and "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True


def task_manager(include_path: str | Path | None = None, names: Sequence[str] = ()) -> Any:
    """lm-eval's TaskManager over the YAML under ``include_path`` plus its built-in tasks.

    Indexing lm-eval's thousands of built-in task files takes seconds, so when every name is
    one of ``include_path``'s own tasks the built-in ones are left out.
    """
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return _full_task_manager(None)
    if not Path(include_path).is_dir():
        raise DataError(f"--include-path {include_path} is not a directory of task YAML files")
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    if names and all(n in local.all_tasks for n in names):
        return local
    return _full_task_manager(str(include_path))


@functools.lru_cache(maxsize=4)
def _full_task_manager(include_path: str | None) -> Any:
    """Built once per process: the index of lm-eval's own tasks does not change while it runs."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _missing_dataset(name: str, cfg: dict[str, Any], error: Exception) -> DataError:
    path, subset = cfg.get("dataset_path", "?"), cfg.get("dataset_name")
    call = f"datasets.load_dataset({path!r}" + (f", {subset!r})" if subset else ")")
    return DataError(
        f"task {name!r}: dataset {path!r}{f' ({subset})' if subset else ''} is not available "
        f'offline ({type(error).__name__}); on a connected machine run python -c "import '
        f'datasets; {call}" and copy ~/.cache/huggingface/datasets here (pass it as --data-dir), '
        "or write a task YAML over local JSONL and pass its folder as --include-path"
    )


def load_tasks(manager: Any, names: Sequence[str]) -> dict[str, Any]:
    """``{task name: lm-eval Task}`` for every name (a task, group or tag), datasets loaded.

    Raises:
        DataError: an unknown name (with the closest known ones), or a dataset that cannot be
            loaded (with what to download and where).
    """
    known = manager.all_tasks
    for name in names:
        if name not in known and not Path(name).is_file():
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise DataError(
                f"unknown lm-eval task {name!r}; {hint}list them with `lm-eval ls tasks`, or "
                "pass the folder of your own task YAML as --include-path"
            )
    tasks: dict[str, Any] = {}
    for name in names:
        try:
            tasks.update(manager.load([name])["tasks"])
        except (ConnectionError, FileNotFoundError) as e:
            entry = manager.task_index.get(name)
            raise _missing_dataset(name, (entry and entry.cfg) or {}, e) from e
        except Exception as e:  # datasets' own DatasetNotFoundError derives from none of those
            if type(e).__name__ not in ("DatasetNotFoundError", "DataFilesNotFoundError"):
                raise
            entry = manager.task_index.get(name)
            raise _missing_dataset(name, (entry and entry.cfg) or {}, e) from e
    return tasks


def check_fewshot(tasks: dict[str, Any], num_fewshot: int | None) -> None:
    """Raises DataError when a task cannot supply ``num_fewshot`` examples."""
    if not num_fewshot:
        return
    if num_fewshot < 0:
        raise DataError(f"--num-fewshot is {num_fewshot}; it must be 0 or more")
    for name, task in tasks.items():
        docs = task.fewshot_docs() if hasattr(task, "fewshot_docs") else None
        if docs is None:
            raise DataError(
                f"task {name!r} has no training, validation or fewshot split to draw "
                f"{num_fewshot} examples from; run it zero-shot (drop --num-fewshot)"
            )
        # When examples come from the split being scored, lm-eval drops the question itself.
        same = task.config.fewshot_split in (None, task.config.test_split) and not (
            task.has_training_docs() or task.has_validation_docs()
        )
        available = len(docs) - (1 if same else 0)
        if num_fewshot > available:
            raise DataError(
                f"--num-fewshot {num_fewshot} is more than task {name!r} has examples to draw "
                f"from ({available}); use at most {available}"
            )


def sample_indices(tasks: dict[str, Any], offset: int, limit: int | None) -> dict[str, list[int]]:
    """lm-eval's ``samples``: documents ``[offset, offset + limit)`` of every task."""
    if offset < 0 or (limit is not None and limit < 1):
        raise DataError(f"--offset {offset} / --limit {limit}: need offset >= 0 and limit >= 1")
    out = {}
    for name, task in tasks.items():
        n = len(list(task.eval_docs))
        if offset >= n:
            raise DataError(f"--offset {offset} is past the end of task {name!r} ({n} documents)")
        end = n if limit is None else min(n, offset + limit)
        out[name] = list(range(offset, end))
    return out


@dataclass(frozen=True)
class PaperRow:
    task: str
    metric: str
    ours: float | None  # percent
    paper: dict[str, float]  # published model name -> percent


def paper_table() -> dict[str, Any]:
    """The published zero-shot table shipped as package data (with its source)."""
    text = resources.files("mlx_openelm").joinpath("data/openelm_paper_lm_eval.json").read_text()
    return json.loads(text)


def paper_models(config: dict[str, Any]) -> list[str]:
    """Published model names (base and Instruct) for a model's size, read from its config."""
    table = paper_table()
    for size, shape in table["sizes"].items():
        if all(config.get(k) == v for k, v in shape.items()):
            return [f"OpenELM-{size}", f"OpenELM-{size}-Instruct"]
    return []


def paper_rows(results: dict[str, Any], config: dict[str, Any]) -> list[PaperRow]:
    """Our score beside the paper's for each task of the preset (paper: none for other sizes)."""
    table, names = paper_table(), paper_models(config)
    rows = []
    for task, metric in table["metrics"].items():
        value = results.get("results", {}).get(task, {}).get(f"{metric},none")
        ours = None if value is None else 100.0 * float(value)
        rows.append(PaperRow(task, metric, ours, {n: table["results"][n][task] for n in names}))
    return rows


def task_names(tasks: str | None, preset: str | None = None) -> tuple[str, ...]:
    """Names from a comma-separated ``--tasks`` list, or the preset's (``openelm-paper``).

    Raises:
        DataError: both or neither given, or an unknown preset.
    """
    if preset is not None:
        if tasks:
            raise DataError(f"--preset {preset} picks its own tasks; drop --tasks {tasks}")
        if preset != PAPER_PRESET:
            raise DataError(f"unknown preset {preset!r}; the only one is {PAPER_PRESET!r}")
        return tuple(paper_table()["metrics"])
    names = tuple(t.strip() for t in (tasks or "").split(",") if t.strip())
    if not names:
        raise DataError("no tasks given; pass --tasks arc_easy,hellaswag or --preset openelm-paper")
    return names


def write_results(path: str | Path, results: dict[str, Any]) -> None:
    """``results`` as JSON at ``path``, written to a temporary file first, then renamed."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    keep = {k: v for k, v in results.items() if k != "samples"}
    tmp.write_text(json.dumps(keep, indent=2, default=handle_non_serializable), encoding="utf-8")
    tmp.replace(path)


@dataclass(frozen=True)
class LMEvalOptions:
    """What to run; the defaults are lm-eval's (each task's own few-shot count, all documents)."""

    tasks: tuple[str, ...] = ()
    num_fewshot: int | None = None
    limit: int | None = None
    offset: int = 0
    include_path: str | Path | None = None
    apply_chat_template: bool = False
    cache: str | Path | None = None  # lm-eval's request cache (sqlite): a rerun resumes
    seed: int = 1234


def run_lm_eval(lm: Any, options: LMEvalOptions) -> dict[str, Any]:
    """Run ``options.tasks`` through lm-eval with ``lm`` (an ``OpenELMLM``).

    Returns:
        lm-eval's results dict (``results``, ``n-shot``, ``configs``, ``versions``...).

    Raises:
        LMEvalMissingError: lm-eval is not installed.
        DataError: unknown task, dataset not available offline, too many few-shot examples, bad
            slice, or ``apply_chat_template`` on a model without a chat template.
    """
    require_lm_eval()
    import lm_eval

    if not options.tasks:
        raise DataError("no tasks given; pass --tasks arc_easy,hellaswag or --preset openelm-paper")
    if options.apply_chat_template and lm.tok.chat_template is None:
        raise DataError(
            f"--apply-chat-template: {lm.name} has no chat template (a base model); drop the flag"
        )
    manager = task_manager(options.include_path, options.tasks)
    tasks = load_tasks(manager, options.tasks)
    check_fewshot(tasks, options.num_fewshot)
    samples = None
    if options.offset or options.limit is not None:
        samples = sample_indices(tasks, options.offset, options.limit)
    seed = options.seed
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks.values()),
        task_manager=manager,
        num_fewshot=options.num_fewshot,
        samples=samples,
        apply_chat_template=options.apply_chat_template,
        use_cache=None if options.cache is None else str(options.cache),
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
