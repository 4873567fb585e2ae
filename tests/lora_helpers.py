"""Shared helpers for the LoRA tests: tiny JSONL datasets and adapters with non-zero weights."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

WORDS = (
    "the a of and to in is you that it he was for on are as with his they at be this have from "
    "hello world model token language apple open efficient chat user assistant system reply"
).split()


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sentences(n: int, seed: int = 0, lo: int = 4, hi: int = 24) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def text_data(folder: Path, n_train: int = 48, n_valid: int = 12, n_test: int = 0) -> Path:
    """A --data folder of {"text"} records (a repeated pattern, so training can learn it)."""
    for split, n, seed in (("train", n_train, 0), ("valid", n_valid, 1), ("test", n_test, 2)):
        if n:
            write_jsonl(folder / f"{split}.jsonl", [{"text": t} for t in sentences(n, seed)])
    return folder


def randomize_adapters(model: Any, seed: int = 0, std: float = 0.05) -> None:
    """Give every trainable tensor a random value (fresh LoRA has lora_b = 0: no effect)."""
    mx.random.seed(seed)
    params = tree_flatten(model.trainable_parameters())
    model.load_weights([(k, v + std * mx.random.normal(v.shape)) for k, v in params], strict=False)
    mx.eval(model.parameters())


def make_adapters(model_dir: Path, out: Path, spec: Any, seed: int = 0) -> Path:
    """An adapter folder for ``model_dir`` with random (non-zero) weights."""
    from mlx_openelm.loading import load
    from mlx_openelm.lora import apply_adapters
    from mlx_openelm.lora.adapters import save_adapters

    model, _ = load(model_dir)
    mx.random.seed(seed)
    config = apply_adapters(model, spec)
    randomize_adapters(model, seed=seed)
    return save_adapters(model, out, config)


def write_random_lora(folder: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter folder (rank 4 on the last two layers' qkv) with N(0, 1) weights."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_openelm.loading import load_model

    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["attn.qkv_proj"]}
    model, _ = load_model(folder)
    model.freeze()
    linear_to_lora_layers(model, 2, lora)
    mx.random.seed(seed)
    params = {k: mx.random.normal(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), params)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out
