"""Convert adapters to and from Hugging Face PEFT's LoRA format.

The two formats store the same update with transposed factors:

- mlx-lm: ``y += scale · (x @ lora_a) @ lora_b`` with ``lora_a`` (in, r), ``lora_b`` (r, out);
- PEFT: ``W += (lora_alpha / r) · lora_B.weight @ lora_A.weight`` with ``lora_A.weight`` (r, in),
  ``lora_B.weight`` (out, r) — or ``lora_alpha / √r`` with ``use_rslora``.

So ``lora_A = lora_aᵀ``, ``lora_B = lora_bᵀ`` and ``lora_alpha = scale · r``. PEFT names tensors
``base_model.model.<module path>.lora_A.weight``; OpenELM's module paths are the same in
transformers and here (``transformer.layers.3.attn.qkv_proj``). DoRA's magnitude vector (norm of
each output row, as in mlx-lm) is ``<path>.lora_magnitude_vector``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import AdapterError
from ..folder import atomic_output
from ..jsonio import read_json
from .adapters import (
    ADAPTER_FILE,
    CONFIG_FILE,
    AdapterSpec,
    apply_adapters,
    block_linear_names,
    check_adapter_numbers,
    read_adapter_config,
)

PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(
    r"^base_model\.model\.(?P<path>.+?)\."
    r"(?:(?P<factor>lora_[AB])(?:\.[^.]+)?\.weight|lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?)$"
)
_LAYER_PATH = re.compile(r"^transformer\.layers\.(?P<layer>\d+)\.(?P<key>.+)$")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def export_peft(
    adapter_path: str | Path, output: str | Path, base_model: str | None = None, force: bool = False
) -> Path:
    """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Raises:
        AdapterError: not a LoRA/DoRA adapter folder (full fine-tunes have no PEFT form).
        OutputExistsError: ``output`` exists and ``force`` is not set.
    """
    config = read_adapter_config(adapter_path)
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        raise AdapterError(
            f"{adapter_path} is a full fine-tune; PEFT holds LoRA/DoRA adapters only "
            "(fuse it with `mlx-openelm fuse` instead)"
        )
    params = config["lora_parameters"]
    rank, scale = int(params["rank"]), float(params["scale"])
    tensors: dict[str, mx.array] = {}
    layers: set[int] = set()
    for name, value in mx.load(str(Path(adapter_path) / ADAPTER_FILE)).items():
        path, leaf = name.rsplit(".", 1)
        renamed = {
            "lora_a": (f"{path}.lora_A.weight", value.T),
            "lora_b": (f"{path}.lora_B.weight", value.T),
            "m": (f"{path}.lora_magnitude_vector", value),
        }.get(leaf)
        if renamed is None:
            raise AdapterError(f"{adapter_path}: unexpected tensor {name}; it is not a LoRA factor")
        tensors[_PREFIX + renamed[0]] = mx.contiguous(renamed[1])
        match = _LAYER_PATH.match(path)
        if match:
            layers.add(int(match["layer"]))
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or (config.get("base_model") or {}).get("path"),
        "r": rank,
        "lora_alpha": _number(scale * rank),
        "lora_dropout": float(params.get("dropout", 0.0)),
        "target_modules": sorted({k.rsplit(".", 1)[-1] for k in params.get("keys") or []}),
        "layers_to_transform": sorted(layers),
        "layers_pattern": "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": kind == "dora",
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with atomic_output(output, force=force) as tmp:
        mx.save_safetensors(str(tmp / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return Path(output)


def _read_peft(folder: Path) -> tuple[dict[str, Any], dict[str, mx.array]]:
    config_file, weights_file = folder / CONFIG_FILE, folder / PEFT_WEIGHTS
    if not config_file.is_file():
        raise AdapterError(f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    if not weights_file.is_file():
        pickle = " (only the pickled adapter_model.bin is there: re-save it with safetensors)"
        raise AdapterError(
            f"{folder}: {PEFT_WEIGHTS} is missing"
            + (pickle if (folder / "adapter_model.bin").is_file() else "")
        )
    config = read_json(config_file, AdapterError, "re-save the adapter with PEFT")
    if config.get("peft_type", "LORA") != "LORA" or "r" not in config:
        raise AdapterError(
            f"{config_file}: only PEFT LoRA adapters (peft_type LORA with r) can be imported"
        )
    return config, mx.load(str(weights_file))


def _to_mlx_names(weights: dict[str, mx.array], where: Path) -> tuple[dict, set[int], list[str]]:
    """PEFT tensors → (mlx-lm tensors, layer indices, block-relative module keys)."""
    out: dict[str, mx.array] = {}
    layers: set[int] = set()
    keys: list[str] = []
    for name, value in weights.items():
        match = _PEFT_KEY.match(name)
        layer = _LAYER_PATH.match(match["path"]) if match else None
        if layer is None:
            raise AdapterError(
                f"{where}: tensor {name} is not a LoRA factor of an OpenELM block "
                "(expected base_model.model.transformer.layers.N.<module>.lora_A.weight)"
            )
        leaf = {"lora_A": "lora_a", "lora_B": "lora_b", None: "m"}[match["factor"]]
        out[f"{match['path']}.{leaf}"] = value.T if leaf != "m" else value
        layers.add(int(layer["layer"]))
        if layer["key"] not in keys:
            keys.append(layer["key"])
    return out, layers, keys


def import_peft(
    peft_path: str | Path, model: str | Path, output: str | Path, force: bool = False
) -> Path:
    """Write an mlx-lm-layout adapter folder from a PEFT LoRA folder, checked against ``model``.

    Raises:
        AdapterError: not a PEFT LoRA folder, unsupported options, layers that are not the last
            N, or tensors whose shape does not fit ``model`` (the tensor is named).
        OutputExistsError: ``output`` exists and ``force`` is not set.
    """
    from ..loading import load_model, resolve_model_path

    folder = Path(peft_path)
    config, weights = _read_peft(folder)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"{folder}: per-module rank_pattern/alpha_pattern is not supported")
    check_adapter_numbers(
        folder / CONFIG_FILE,
        rank=config["r"],
        scale=config.get("lora_alpha", config["r"]),
        dropout=config.get("lora_dropout", 0.0),
    )
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    tensors, layers, keys = _to_mlx_names(weights, folder)
    net, _ = load_model(resolve_model_path(model), lazy=True, dequantize=False)
    keys = [k for k in block_linear_names(net) if k in keys]  # the block's own order
    total = len(net.layers)
    if sorted(layers) != list(range(total - len(layers), total)):
        raise AdapterError(
            f"{folder}: adapters sit on layers {sorted(layers)}, but mlx-lm's layout needs the "
            f"last N of the model's {total} layers"
        )
    kind = "dora" if config.get("use_dora") else "lora"
    spec = AdapterSpec(
        fine_tune_type=kind,
        rank=rank,
        alpha=scale * rank,
        dropout=float(config.get("lora_dropout", 0.0)),
        targets=tuple(keys),
        num_layers=len(layers),
    )
    adapter_config = apply_adapters(net, spec)
    adapter_config["lora_parameters"]["scale"] = scale  # exact, also for rsLoRA
    adapter_config["base_model"] = {"path": config.get("base_model_name_or_path")}
    _check_shapes(net, tensors, folder)
    with atomic_output(output, force=force) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), tensors, metadata={"format": "mlx"})
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return Path(output)


def _check_shapes(net: Any, tensors: dict[str, mx.array], where: Path) -> None:
    expected = dict(tree_flatten(net.trainable_parameters()))
    problems = sorted(
        f"{name} has shape {tuple(v.shape)}, the model needs {tuple(expected[name].shape)}"
        if name in expected
        else f"{name} has no place in the model"
        for name, v in tensors.items()
        if name not in expected or tuple(v.shape) != tuple(expected[name].shape)
    )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}" + (" …" if len(missing) > 4 else ""))
    if problems:
        raise AdapterError(
            f"PEFT adapters in {where} do not fit this model: {'; '.join(problems[:4])}; "
            "import them onto the base model they were trained on"
        )
