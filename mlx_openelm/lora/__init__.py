"""LoRA / DoRA / full fine-tuning of OpenELM: data, training loop, adapters, fuse, PEFT, plots.

mlx-lm's adapter layers (``LoRALinear``, ``DoRALinear``) and folder layout, with our own loop:
packing, every-assistant-turn masking, exact resume, best checkpoint, early stop, data parallel.

Names are imported on first use, so ``mlx_openelm.lora.config`` (settings only) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterSpec": "config",
    "DEFAULT_TARGETS": "config",
    "EvalReport": "config",
    "SaveReport": "config",
    "StartReport": "config",
    "StepReport": "config",
    "TrainConfig": "config",
    "TrainResult": "config",
    "apply_adapters": "adapters",
    "read_adapter_config": "adapters",
    "save_adapters": "adapters",
    "Dataset": "data",
    "Datasets": "data",
    "encode_file": "data",
    "load_datasets": "data",
    "FuseResult": "fusing",
    "fuse": "fusing",
    "export_peft": "peft",
    "import_peft": "peft",
    "plot_metrics": "plot",
    "DataReport": "run",
    "finetune": "run",
    "train": "trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
