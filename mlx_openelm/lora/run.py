"""``finetune()``: a whole ``mlx-openelm lora`` run as one call (load, train, test, plot)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from .adapters import AdapterSpec
from .checkpoint import check_adapter_folder
from .compute import evaluate
from .config import Callback, EvalReport, TrainConfig, TrainResult
from .data import load_datasets
from .metrics import perplexity
from .plot import plot_metrics, require_matplotlib
from .trainer import train

_SHAPE_FIELDS = ("num_transformer_layers", "model_dim", "head_dim", "vocab_size")


@dataclass(frozen=True, kw_only=True)
class DataReport:
    """Sent before training: what each split holds (examples, tokens, truncated, dropped)."""

    splits: dict[str, dict[str, Any]]


def base_model_info(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """What identifies a base model in an adapter config: its shape (and where it was)."""
    info: dict[str, Any] = {k: config.get(k) for k in _SHAPE_FIELDS}
    info["quantization"] = config.get("quantization")
    info["path"] = str(folder)
    return info


def finetune(
    model: str | Path,
    adapter_path: str | Path,
    *,
    data: str | Path | None = None,
    train_file: str | Path | None = None,
    valid_file: str | Path | None = None,
    spec: AdapterSpec | None = None,
    config: TrainConfig | None = None,
    mask_prompt: bool = False,
    test: bool = False,
    plot: bool = False,
    tokenizer: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    callback: Callback | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on JSONL data and write the adapter folder ``adapter_path``.

    Data comes from ``data`` (a folder with train.jsonl, optional valid.jsonl and test.jsonl) or
    from ``train_file``/``valid_file``. ``test`` evaluates test.jsonl at the end (loss and
    perplexity in ``result.extra``); ``plot`` writes ``loss.png`` beside ``metrics.jsonl``.
    ``callback`` receives a ``DataReport`` and then the training reports.

    Raises:
        DataError, ConfigError, ModelNotFoundError, OutputExistsError: before anything is written.
        MissingDependencyError: ``plot`` without matplotlib (also before anything is written).
        TrainingError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    from ..loading import load, load_config, resolve_model_path

    spec, config = spec or AdapterSpec(), config or TrainConfig()
    spec.validate()  # fail before the slow part
    config.validate()
    check_adapter_folder(Path(adapter_path), resume, force)
    if plot:
        require_matplotlib()
    folder = resolve_model_path(model)
    net, tok = load(folder, tokenizer=tokenizer)
    datasets = load_datasets(
        tok, data, train_file, valid_file, test, config.max_seq_len, mask_prompt
    )
    if callback is not None and mx.distributed.init().rank() == 0:
        splits = {"train": datasets.train, "valid": datasets.valid, "test": datasets.test}
        callback(DataReport(splits={k: d.summary() for k, d in splits.items() if d is not None}))
    info = base_model_info(folder, load_config(folder))
    result = train(
        net, datasets.train, datasets.valid, spec, config, adapter_path, info, resume, force,
        callback,
    )  # fmt: skip
    if datasets.test is not None:
        pack, capacity = result.extra["pack"], result.extra["capacity"]
        loss, tokens = evaluate(net, datasets.test, config.batch_size, capacity, pack)
        ppl = perplexity(loss)
        result.extra.update(test_loss=loss, test_ppl=ppl)
        if callback is not None and mx.distributed.init().rank() == 0:
            callback(
                EvalReport(
                    step=result.steps, split="test", loss=loss, perplexity=ppl, tokens=tokens
                )
            )
    if plot and mx.distributed.init().rank() == 0:
        out = Path(adapter_path) / "loss.png"
        result.extra["plot"] = plot_metrics(Path(adapter_path) / "metrics.jsonl", out)
    return result
