"""Loading MLX model folders (and Hugging Face OpenELM folders, which share the tensor names).

``load(path_or_repo)`` → ``(model, tokenizer)``. A local folder is read directly; a hub repo id is
converted once into a local cache folder (``$MLX_OPENELM_HOME``, default
``~/.cache/mlx-openelm/models``) and reused afterwards.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import fastmath
from .config import ModelArgs
from .config_check import check_fits_memory
from .errors import AdapterError, ConfigError, ModelNotFoundError, WeightsError
from .jsonio import read_json
from .mismatch import first_names, tensor_mismatches
from .model import Model
from .runtime import dequantize_model, float32_bytes, plan_execution


def cache_root() -> Path:
    """Where hub models are converted to: ``$MLX_OPENELM_HOME/models`` or ``~/.cache/...``."""
    home = os.environ.get("MLX_OPENELM_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "mlx-openelm"
    return base / "models"


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` with no local meaning: not an existing path, one slash, no leading dot/slash."""
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not name.startswith((".", "/", "~"))
        and not Path(name).exists()
    )


def resolve_model_path(model: str | Path, **convert_options: Any) -> Path:
    """Turn a folder path or hub repo id into a local MLX model folder.

    A repo id is downloaded and converted into ``cache_root()/<org>--<name>`` the first time
    (``convert_options`` go to the converter) and reused afterwards.

    Raises:
        ModelNotFoundError: the path does not exist, or the repo cannot be fetched.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if not looks_like_repo_id(name):
        raise ModelNotFoundError(
            f"model {name!r} not found: it is neither a local folder nor a hub repo id like "
            "'apple/OpenELM-270M-Instruct'"
        )
    cached = cache_root() / name.replace("/", "--")
    if (cached / "config.json").is_file():
        return cached
    from .convert import convert  # imported lazily: the converter pulls in more machinery

    convert(name, cached, **convert_options)
    return cached


def load_config(folder: Path) -> dict[str, Any]:
    """Read ``config.json`` from a model folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(
            f"{folder} is not a model folder: it has no config.json "
            "(convert a checkpoint first with `mlx-openelm convert`)"
        )
    return read_json(path, ConfigError, "re-create it or re-convert")


def load_weights(folder: Path) -> dict[str, mx.array]:
    """Load every ``model*.safetensors`` tensor of a folder (lazily memory-mapped by MLX).

    Raises:
        WeightsError: no weight files, or a header that is malformed or disagrees with its file.
    """
    files = sorted(glob.glob(str(Path(folder) / "model*.safetensors")))
    if not files:
        raise WeightsError(
            f"{folder} has no model*.safetensors weights; convert the checkpoint with "
            "`mlx-openelm convert SOURCE OUTPUT`"
        )
    from .convert.tensors import open_safetensors  # the converter's header checks

    weights: dict[str, mx.array] = {}
    for f in files:
        # MLX's own reader multiplies shapes in 64 bits: a crafted [2**31, 2**31, 4] comes back
        # with a negative shape. Check every entry against the file first.
        open_safetensors(Path(f))
        try:
            weights.update(mx.load(f))
        except (RuntimeError, ValueError) as e:
            raise WeightsError(f"cannot read {f}: {e}; the file is damaged, re-convert it") from e
    return weights


def check_weights(model: nn.Module, weights: dict[str, mx.array], where: str) -> None:
    """Compare ``weights`` with the model's parameters; raise once listing every mismatch.

    Raises:
        WeightsError: missing, unexpected or mis-shaped tensors (all of them named).
    """
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    found = {k: v.shape for k, v in weights.items()}
    problems = tensor_mismatches(expected, found, names=first_names)
    if problems:
        raise WeightsError(
            f"weights in {where} do not match the config: "
            + "; ".join(problems)
            + ". The weights and config.json come from different models; re-convert the checkpoint"
        )


def quantize_like(model: nn.Module, quantization: dict[str, Any], weights: dict) -> None:
    """Swap in quantized modules for every layer the weights store quantized.

    ``quantization`` is mlx-lm's config entry: defaults ``group_size``/``bits``/``mode`` plus
    optional per-module overrides keyed by module path (a dict, or ``False`` to keep it float).
    """

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quantization.get("group_size", 64),
        bits=quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def load_model(
    folder: str | Path, lazy: bool = False, dequantize: bool | None = None
) -> tuple[Model, dict[str, Any]]:
    """Build the model from ``folder/config.json`` and load its weights.

    Args:
        dequantize: for quantized folders: True expands the weights to float32, False keeps the
            quantized kernels, None decides (``mlx_openelm.runtime.plan_execution``: on a CPU,
            when memory allows). ``model.execution`` records what was done.

    Returns:
        ``(model, config_dict)``.

    Raises:
        ModelNotFoundError, ConfigError, WeightsError: with the file or field at fault.
    """
    folder = Path(folder)
    config = load_config(folder)
    args = ModelArgs.from_dict(config)
    check_fits_memory(args, str(folder))
    fastmath.keep_freed_memory()
    model = Model(args)
    weights = model.sanitize(load_weights(folder))
    if args.quantization:
        quantize_like(model, args.quantization, weights)
    check_weights(model, weights, str(folder))
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    model.execution = plan_execution(args.quantization, float32_bytes(model), dequantize)
    if model.execution.dequantized:
        dequantize_model(model)
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def load_adapters(model: Model, adapter_path: str | Path) -> Model:
    """Apply LoRA/DoRA adapters saved in mlx-lm's layout (``adapters.safetensors`` + config)."""
    from mlx_lm.tuner.utils import load_adapters as _mlx_lm_load_adapters

    from .lora.adapters import read_adapter_config

    adapter_path = Path(adapter_path)
    read_adapter_config(adapter_path)  # files present, JSON valid, the fields mlx-lm reads
    try:
        model = _mlx_lm_load_adapters(model, str(adapter_path))
    except ValueError as e:  # mlx-lm reports shape/name mismatches as ValueError
        detail = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise AdapterError(  # one line: mlx-lm lists one offending tensor per line
            f"adapters in {adapter_path} do not fit this model: {detail}; "
            "use the base model they were trained on"
        ) from e
    _check_adapters_finite(adapter_path)
    model.eval()
    return model


def _check_adapters_finite(adapter_path: Path) -> None:
    """Refuse adapters holding NaN/inf: every output through them would be NaN (a diverged
    run; the trainer stops at a non-finite loss, but a file from elsewhere may hold one).

    Raises:
        AdapterError: naming the tensors (at most 8) and how to recover.
    """
    from .lora.adapters import ADAPTER_FILE

    weights = mx.load(str(adapter_path / ADAPTER_FILE))
    bad = [
        name
        for name, array in sorted(weights.items())
        if mx.issubdtype(array.dtype, mx.floating) and not mx.isfinite(array).all().item()
    ]
    if bad:
        listed = ", ".join(bad[:8]) + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else "")
        raise AdapterError(
            f"{adapter_path / ADAPTER_FILE}: {len(bad)} tensor(s) hold NaN or infinite values "
            f"({listed}); the training run diverged: retrain with a lower --learning-rate "
            "(--keep-best keeps the best adapters seen on validation data)"
        )


def load(
    path_or_repo: str | Path,
    adapter_path: str | Path | None = None,
    tokenizer: str | Path | None = None,
    lazy: bool = False,
    dequantize: bool | None = None,
) -> tuple[Model, Any]:
    """Load an OpenELM model and its tokenizer.

    Args:
        path_or_repo: an MLX (or Hugging Face OpenELM) folder, or a hub repo id such as
            ``apple/OpenELM-270M-Instruct`` (converted once into the local cache).
        adapter_path: optional LoRA adapter folder to apply.
        tokenizer: optional explicit ``tokenizer.model`` file.
        lazy: leave weights memory-mapped until first use.
        dequantize: quantized folders: True runs them in float32, False keeps the quantized
            kernels, None (default) dequantizes on a CPU when memory allows (see ``runtime``).

    Returns:
        ``(model, tokenizer)``: a ``mlx_openelm.model.Model`` and a
        ``mlx_openelm.tokenizer.Tokenizer``.
    """
    from .hub import resolve_tokenizer_file
    from .tokenizer import Tokenizer

    folder = resolve_model_path(path_or_repo)
    model, _ = load_model(folder, lazy=lazy, dequantize=dequantize)
    if adapter_path is not None:
        model = load_adapters(model, adapter_path)
    tok_file = resolve_tokenizer_file(model_dir=folder, tokenizer=tokenizer)
    return model, Tokenizer.from_folder(folder, tokenizer_file=tok_file)
