"""Checkpoints in every format a user brings, written from plain NumPy weights (HF names).

HF folders: ``config.json`` + safetensors (single or sharded with an index, written with
``mx.save_safetensors``) or ``pytorch_model.bin`` (single or sharded, written by ``torchfmt``, our
pure-Python ``torch.save``). CoreNet: the names without ``transformer.``, the embedding padded to
32128 rows like CoreNet trains it, a plain state dict or a training checkpoint, and a YAML with
the ``model.language_modeling.general_gpt`` section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import yaml

import torchfmt
from openelm_ref import forward

PROBE_IDS = [1, 15, 27, 3, 99, 250, 7, 42, 150, 8, 301, 64]
CORENET_ROWS = 32128


def _chunks(names: list[str], n: int) -> list[list[str]]:
    return [list(part) for part in np.array_split(np.array(names, dtype=object), n)]


def write_hf_safetensors(
    folder: Path,
    config: dict[str, Any],
    weights: dict[str, np.ndarray],
    shards: int = 1,
    dtype: mx.Dtype = mx.float32,
) -> Path:
    """An HF folder with ``model.safetensors`` (or ``shards`` files plus the index)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    arrays = {k: mx.array(v).astype(dtype) for k, v in weights.items()}
    if shards == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), arrays)
        return folder
    weight_map = {}
    for i, names in enumerate(_chunks(list(arrays), shards)):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(folder / fname), {k: arrays[k] for k in names})
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def write_hf_bin(
    folder: Path, config: dict[str, Any], weights: dict[str, np.ndarray], shards: int = 1
) -> Path:
    """An HF folder with ``pytorch_model.bin`` (or ``shards`` files plus the index)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        torchfmt.save(_state(weights, list(weights)), folder / "pytorch_model.bin")
        return folder
    weight_map = {}
    for i, names in enumerate(_chunks(list(weights), shards)):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torchfmt.save(_state(weights, names), folder / fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


def _state(weights: dict[str, np.ndarray], names: list[str]) -> dict[str, Any]:
    return {k: torchfmt.from_numpy(np.ascontiguousarray(weights[k])) for k in names}


def corenet_state(weights: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """CoreNet's names for HF weights, the embedding padded with random rows to 32128."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, w in weights.items():
        name = name.removeprefix("transformer.").replace("lm_head.", "classifier.")
        if name in ("token_embeddings.weight", "classifier.weight"):
            pad = rng.standard_normal((CORENET_ROWS - w.shape[0], w.shape[1])).astype(w.dtype)
            w = np.concatenate([w, pad])
        out[name] = w
    return out


def write_corenet_pt(path: Path, state: dict[str, np.ndarray], wrapped: bool = False) -> Path:
    """A CoreNet ``.pt``: the state dict, or a training checkpoint holding it."""
    tensors = _state(state, list(state))
    obj: Any = tensors
    if wrapped:
        obj = {"iterations": 5000, "epoch": 1, "model_state_dict": tensors, "best_metric": 2.5}
    path.parent.mkdir(parents=True, exist_ok=True)
    return torchfmt.save(obj, path)


def write_corenet_yaml(path: Path, config: dict[str, Any]) -> Path:
    """A CoreNet training YAML whose ``general_gpt`` section spells out ``config``'s shape."""
    keys = (
        "num_transformer_layers", "model_dim", "head_dim", "num_gqa_groups", "qkv_multipliers",
        "ffn_multipliers", "ffn_dim_divisor", "normalize_qk_projections",
        "share_input_output_layers", "ffn_with_glu",
    )  # fmt: skip
    section = {k: config[k] for k in keys}
    section.update(vocab_size=CORENET_ROWS, max_context_length=2048, padding_index=32000)
    data = {"model": {"language_modeling": {"name": "general_gpt", "general_gpt": section}}}
    path.write_text(yaml.safe_dump(data))
    return path


def reference_logits(weights: dict[str, np.ndarray], config: dict[str, Any]) -> np.ndarray:
    """Float64 reference logits of :data:`PROBE_IDS` (ids clipped to the vocabulary)."""
    ids = [i % config["vocab_size"] for i in PROBE_IDS]
    return forward(weights, ids, config["head_dim"], rope_base=config["rope_freq_constant"])


def model_logits(folder: Path, config: dict[str, Any]) -> np.ndarray:
    """Our model's logits of :data:`PROBE_IDS`, loaded from a converted folder, in float32."""
    from mlx_openelm.loading import load_model

    model, _ = load_model(folder)
    ids = [i % config["vocab_size"] for i in PROBE_IDS]
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))
