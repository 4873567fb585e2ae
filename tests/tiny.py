"""Tiny random OpenELM checkpoints for tests (HF tensor names, float32 NumPy)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mlx_openelm.config import ModelArgs


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """An HF-style config.json dict with layer-wise scaling in a tiny shape (4 layers, dim 64)."""
    cfg = {
        "model_type": "openelm",
        "num_transformer_layers": 4,
        "model_dim": 64,
        "head_dim": 16,
        "num_gqa_groups": 2,
        "qkv_multipliers": [0.5, 1.0],
        "ffn_multipliers": [0.5, 4.0],
        "ffn_dim_divisor": 32,
        "vocab_size": 384,
        "rope_freq_constant": 10000,
        "normalize_qk_projections": True,
        "share_input_output_layers": True,
        "ffn_with_glu": True,
    }
    cfg.update(overrides)
    return ModelArgs.from_dict(cfg).to_dict()


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with HF names for ``config``; norms are non-trivial on purpose."""
    args = ModelArgs.from_dict(config)
    rng = np.random.default_rng(seed)
    dim, hd = args.model_dim, args.head_dim

    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32)

    w = {
        "transformer.token_embeddings.weight": rng.standard_normal((args.vocab_size, dim)).astype(
            np.float32
        )
    }
    for i, (q, kv, ffn) in enumerate(zip(args.num_query_heads, args.num_kv_heads, args.ffn_dims)):
        p = f"transformer.layers.{i}."
        w[p + "attn_norm.weight"] = norm(dim)
        w[p + "attn.qkv_proj.weight"] = lin((q + 2 * kv) * hd, dim)
        if args.normalize_qk_projections:
            w[p + "attn.q_norm.weight"] = norm(hd)
            w[p + "attn.k_norm.weight"] = norm(hd)
        w[p + "attn.out_proj.weight"] = lin(dim, q * hd)
        w[p + "ffn_norm.weight"] = norm(dim)
        w[p + "ffn.proj_1.weight"] = lin((2 if args.ffn_with_glu else 1) * ffn, dim)
        w[p + "ffn.proj_2.weight"] = lin(dim, ffn)
    w["transformer.norm.weight"] = norm(dim)
    if not args.share_input_output_layers:
        w["lm_head.weight"] = lin(args.vocab_size, dim)
    return w


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| — the project's 'relative' metric for logits."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
