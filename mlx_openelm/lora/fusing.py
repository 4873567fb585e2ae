"""Fuse adapters into the base weights: a plain model folder that needs no adapter at run time.

LoRA/DoRA layers merge through mlx-lm's own ``fuse()`` (``W + scale · Bᵀ·Aᵀ``, DoRA's magnitude
rescaling included); full fine-tunes already hold whole weights. The folder is written by the one
model-folder writer (``mlx_openelm.folder.write_model_folder``): atomic and streamed.

On a quantized base the merged weights are quantized again (same bits and group size) unless
``dequantize`` is set. That rounding lands on the adapter's update too, so the fused model is
*not* exactly base + adapter; :func:`fuse` measures the drift on a probe and reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import ConfigError
from ..folder import write_model_folder
from ..jsonio import read_json
from ..loading import load_adapters, load_model, resolve_model_path
from .adapters import read_adapter_config

_PROBE_LEN = 32


@dataclass(kw_only=True)
class FuseResult:
    path: Path
    fine_tune_type: str
    fused_layers: int
    quantized: bool  # the output is quantized
    total_size: int
    warning: str | None = None  # set when re-quantization changed the outputs


def _probe(model: nn.Module) -> mx.array:
    vocab = model.args.vocab_size
    tokens = (mx.arange(_PROBE_LEN) * 7919 + 1) % vocab  # a fixed spread of token ids
    logits = model(tokens[None]).astype(mx.float32)
    mx.eval(logits)
    return logits


def _human(nbytes: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} GiB"


def _requantize_warning(quantization: dict[str, Any], drift: float, sizes: tuple[int, int]) -> str:
    bits, group = quantization.get("bits", 4), quantization.get("group_size", 64)
    return (
        f"the base model is {bits}-bit quantized, so the fused weights were re-quantized to "
        f"{bits} bits (groups of {group}); the adapter's update is rounded with them, and the "
        f"fused model's logits differ from base + adapter by {drift:.2%} (max relative) on a "
        f"probe. Pass --dequantize for an exact merge in float ({_human(sizes[1])} instead "
        f"of {_human(sizes[0])}), or keep using the adapter unfused"
    )


def _sizes(model: nn.Module) -> tuple[int, int]:
    """``(bytes now, bytes with every quantized layer stored as float16)``."""
    now = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    as_float = now
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            rows, packed = m.weight.shape
            as_float += rows * packed * 32 // m.bits * 2
            as_float -= sum(v.nbytes for _, v in tree_flatten(m.parameters()))
    return now, as_float


def fuse_model(model: nn.Module, dequantize: bool = False) -> int:
    """Merge every adapter layer of ``model`` in place; returns how many were merged."""
    from mlx_lm.utils import dequantize_model

    modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "fuse")]
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in modules]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)
    return len(fused)


def fuse(
    model: str | Path,
    adapter_path: str | Path,
    output: str | Path,
    dequantize: bool = False,
    force: bool = False,
) -> FuseResult:
    """Write ``output``: the base ``model`` with the adapters of ``adapter_path`` merged in.

    Args:
        model: base model folder (or hub id) the adapters were trained on.
        adapter_path: adapter folder (mlx-lm layout).
        output: new model folder (tokenizer and generation config are carried over).
        dequantize: write float weights even when the base is quantized (exact merge).
        force: replace an existing ``output``.

    Returns:
        A :class:`FuseResult`; ``warning`` explains the re-quantization cost when it applies.

    Raises:
        AdapterError: the adapters are unreadable or do not fit the model (tensor named).
        OutputExistsError: ``output`` exists and ``force`` is not set.
    """
    from ..hub import resolve_tokenizer_file
    from ..tokenizer import Tokenizer

    folder = resolve_model_path(model)
    adapter_config = read_adapter_config(adapter_path)
    base, config = load_model(folder, dequantize=False)  # fusing re-quantizes: keep the packing
    tokenizer = Tokenizer.from_folder(folder, resolve_tokenizer_file(model_dir=folder))
    net = load_adapters(base, adapter_path)
    quantized = bool(config.get("quantization")) and not dequantize
    reference = _probe(net) if quantized else None
    sizes = _sizes(net)
    count = fuse_model(net, dequantize=dequantize)
    warning = None
    if reference is not None:
        drift = (mx.abs(_probe(net) - reference).max() / mx.abs(reference).max()).item()
        warning = _requantize_warning(config["quantization"], drift, sizes)
    out_config = dict(config)
    if dequantize:
        out_config.pop("quantization", None)
        out_config.pop("quantization_config", None)
    generation = folder / "generation_config.json"
    totals = write_model_folder(
        output,
        out_config,
        iter(tree_flatten(net.parameters())),
        tokenizer=tokenizer,
        generation_config=(
            read_json(generation, ConfigError, "fix or remove it") if generation.is_file() else None
        ),
        force=force,
    )
    return FuseResult(
        path=Path(output),
        fine_tune_type=adapter_config.get("fine_tune_type", "lora"),
        fused_layers=count,
        quantized=quantized,
        total_size=totals["total_size"],
        warning=warning,
    )
