"""LoRA / DoRA / full fine-tuning adapters in mlx-lm's folder layout.

An adapter folder holds ``adapters.safetensors`` (the trained tensors, named as in the model:
``transformer.layers.3.attn.qkv_proj.lora_a`` …) and ``adapter_config.json`` with the fields
mlx-lm reads (``fine_tune_type``, ``num_layers``, ``lora_parameters`` = ``{rank, scale, dropout,
keys}``), so ``mlx_lm.load(model, adapter_path=...)`` and ``mlx_lm.generate --adapter-path`` use it
unchanged. The layers themselves are mlx-lm's (``LoRALinear``, ``DoRALinear``), which also wrap
quantized linears: a quantized base model trains as QLoRA.

Scale convention: mlx-lm adds ``scale · (x @ lora_a) @ lora_b``; we expose ``alpha`` and store
``scale = alpha / rank`` — the same update as Hugging Face PEFT's ``lora_alpha / r``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import AdapterError, ConfigError, short
from ..folder import atomic_write, atomic_write_text
from ..jsonio import read_json
from .config import FINE_TUNE_TYPES, MAX_RANK, AdapterSpec, is_finite_number

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def block_linear_names(model: nn.Module) -> list[str]:
    """Paths of the linear layers inside a transformer block (``attn.qkv_proj`` …), sorted."""
    return sorted(
        name
        for name, module in model.layers[0].named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and name
    )


def resolve_targets(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Map short names (``qkv_proj``) or full block paths (``attn.qkv_proj``) to block paths.

    Raises:
        ConfigError: a target names no linear layer of the block.
    """
    available = block_linear_names(model)
    keys: list[str] = []
    for target in targets:
        matches = [n for n in available if n == target or n.endswith("." + target)]
        if not matches:
            raise ConfigError(
                f"--targets: {target!r} is not a linear layer of an OpenELM block; "
                f"choose from {', '.join(n.rsplit('.', 1)[-1] for n in available)}"
            )
        keys.extend(matches)
    return [n for n in available if n in keys]  # one canonical order


def check_adapter_size(model: nn.Module, spec: AdapterSpec) -> None:
    """Refuse a LoRA rank beyond the adapted layers' widths or the machine's memory.

    A rank above a layer's larger dimension gives an adapter bigger than the layer it adapts;
    ``--rank 3000000`` would allocate tens of GB before failing, ``--rank 100000000`` crash.

    Raises:
        ConfigError: naming ``--rank``, the limit and why.
    """
    if spec.fine_tune_type == "full":
        return
    from ..config_check import physical_memory

    num_layers = resolve_num_layers(model, spec.num_layers)
    block = dict(model.layers[0].named_modules())
    shapes = [_in_out(block[key]) for key in resolve_targets(model, spec.targets)]
    widest = max(max(shape) for shape in shapes)
    if spec.rank > widest:
        raise ConfigError(
            f"--rank {spec.rank} is larger than the widest adapted layer ({widest}); "
            f"choose a rank up to {widest} (8-64 is usual)"
        )
    params = num_layers * spec.rank * sum(i + o for i, o in shapes)
    need = params * 4 * 4  # float32 weights, gradients and two Adam moments
    ram = physical_memory()
    if ram is not None and need > ram // 2:
        raise ConfigError(
            f"--rank {spec.rank} makes {params:,} adapter parameters, about {need / 1e9:.1f} GB "
            f"to train, more than half this machine's {ram / 1e9:.1f} GB; lower --rank"
        )


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(input, output) width of a linear layer, quantized or not."""
    out_dim, packed = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):
        return packed * 32 // module.bits, out_dim
    return packed, out_dim


def resolve_num_layers(model: nn.Module, requested: int) -> int:
    """How many (last) layers ``requested`` means; -1 = all."""
    total = len(model.layers)
    if requested > total:
        raise ConfigError(f"--num-layers {requested} exceeds the model's {total} layers")
    return total if requested == -1 else requested


def apply_adapters(model: nn.Module, spec: AdapterSpec) -> dict[str, Any]:
    """Freeze ``model`` and make the adapters of ``spec`` its only trainable parameters.

    LoRA/DoRA layers wrap the target linears of the last ``num_layers`` blocks (initialised from
    the current ``mx.random`` state: seed first); ``full`` unfreezes those blocks entirely.

    Returns:
        The ``adapter_config.json`` fields mlx-lm needs (without training details).

    Raises:
        ConfigError: bad spec, unknown target, or ``full`` on a quantized model.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    spec.validate()
    num_layers = resolve_num_layers(model, spec.num_layers)
    keys = resolve_targets(model, spec.targets)
    model.freeze()
    if spec.fine_tune_type == "full":
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise ConfigError(
                "full fine-tuning needs a float model; this one is quantized. Use "
                "--fine-tune-type lora (QLoRA) or convert the model without quantization"
            )
        for layer in model.layers[-num_layers:]:
            layer.unfreeze()
        params = None
    else:
        params = {"rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout, "keys": keys}
        linear_to_lora_layers(model, num_layers, params, use_dora=spec.fine_tune_type == "dora")
    return {
        "fine_tune_type": spec.fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": params,
        "alpha": spec.alpha,
        "targets": list(spec.targets),
    }


def adapter_tensors(model: nn.Module) -> dict[str, mx.array]:
    """The trained tensors (the model's trainable parameters), by parameter name."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model: nn.Module, folder: str | Path, config: dict[str, Any]) -> Path:
    """Write ``adapters.safetensors`` + ``adapter_config.json`` into ``folder`` (each atomically).

    The one adapter writer: periodic, best and final saves all go through it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(model)
    atomic_write(
        folder / ADAPTER_FILE, lambda tmp: mx.save_safetensors(str(tmp), tensors, {"format": "mlx"})
    )
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, default=_jsonable) + "\n")
    return folder


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """Read and check an adapter folder's ``adapter_config.json``.

    Raises:
        AdapterError: the folder, a file or a required field is missing, or the JSON is bad.
    """
    folder = Path(folder)
    for name in (CONFIG_FILE, ADAPTER_FILE):
        if not (folder / name).is_file():
            raise AdapterError(
                f"{folder} is not an adapter folder: {name} is missing "
                "(train one with `mlx-openelm lora`)"
            )
    config = read_json(folder / CONFIG_FILE, AdapterError, "re-train the adapter")
    kind = config.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES or "num_layers" not in config:
        raise AdapterError(
            f"{folder / CONFIG_FILE} lacks a valid fine_tune_type/num_layers; "
            "it was not written by mlx-openelm or mlx-lm"
        )
    params = config.get("lora_parameters") or {}
    if kind != "full" and not (isinstance(params, dict) and {"rank", "scale"} <= set(params)):
        raise AdapterError(
            f"{folder / CONFIG_FILE}: lora_parameters needs 'rank' and 'scale' (mlx-lm's layout)"
        )
    check_adapter_numbers(
        folder / CONFIG_FILE,
        num_layers=config["num_layers"],
        rank=params.get("rank", 1),
        scale=params.get("scale", 1.0),
        dropout=params.get("dropout", 0.0),
    )
    return config


def check_adapter_numbers(
    where: Path, *, num_layers: Any = -1, rank: Any = 1, scale: Any = 1.0, dropout: Any = 0.0
) -> None:
    """The numbers of a stored adapter config, type- and range-checked before use.

    Raises:
        AdapterError: naming the file and the field.
    """
    checks = (
        (
            "num_layers",
            num_layers,
            type(num_layers) is int and (num_layers == -1 or num_layers > 0),
        ),
        ("rank", rank, type(rank) is int and 1 <= rank <= MAX_RANK),
        ("scale", scale, is_finite_number(scale)),
        ("dropout", dropout, is_finite_number(dropout) and 0 <= dropout < 1),
    )
    for name, value, ok in checks:
        if not ok:
            raise AdapterError(
                f"{where}: '{name}' has the impossible value {short(repr(value), 60)}; the file "
                "is damaged or was not written by mlx-openelm, mlx-lm or PEFT"
            )
