"""An independent float64 NumPy implementation of OpenELM, written from the architecture
description (not from our MLX code): pre-norm RMSNorm, fused QKV, per-head q/k RMSNorm, rotate-half
RoPE, grouped-query attention, SwiGLU with [gate | up], tied embeddings.

Head counts are read off the weight shapes, so the reference shares nothing with our config code.
"""

from __future__ import annotations

import math

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_rotate_half(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """x: (H, L, hd). Pairs dimension i with i + hd/2 (GPT-NeoX / Llama HF style)."""
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = 1.0 / base ** (np.arange(half, dtype=np.float64) * 2.0 / hd)
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (L, half)
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# The formulas of transformers' ACT2FN (transformers/activations.py), in float64.
ACTIVATIONS = {
    "swish": silu,
    "silu": silu,
    "gelu": _gelu,
    "gelu_python": _gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + np.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_10": lambda x: np.clip(_gelu(x), -10.0, 10.0),
    "quick_gelu": lambda x: x / (1.0 + np.exp(-1.702 * x)),
    "relu": lambda x: np.maximum(x, 0.0),
    "relu2": lambda x: np.maximum(x, 0.0) ** 2,
    "relu6": lambda x: np.minimum(np.maximum(x, 0.0), 6.0),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "mish": lambda x: x * np.tanh(np.log1p(np.exp(x))),
    "laplace": lambda x: 0.5 * (1.0 + _erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "linear": lambda x: x,
}


def forward(
    weights: dict[str, np.ndarray],
    tokens: list[int],
    head_dim: int,
    eps: float = 1e-6,
    rope_base: float = 10000.0,
    activation: str = "swish",
) -> np.ndarray:
    """Logits (L, vocab) in float64 for one sequence.

    ``activation`` names the FFN non-linearity; whether the FFN is gated (GLU) is read off the
    shapes (``proj_1`` twice as tall as ``proj_2`` is wide).
    """
    act = ACTIVATIONS[activation]
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    emb = w["transformer.token_embeddings.weight"]
    h = emb[np.asarray(tokens)]  # (L, D)
    L = h.shape[0]
    pos = np.arange(L)
    causal = np.tril(np.ones((L, L), dtype=bool))
    i = 0
    while f"transformer.layers.{i}.attn_norm.weight" in w:
        p = f"transformer.layers.{i}."
        x = rms_norm(h, w[p + "attn_norm.weight"], eps)
        n_q = w[p + "attn.out_proj.weight"].shape[1] // head_dim
        n_total = w[p + "attn.qkv_proj.weight"].shape[0] // head_dim
        n_kv = (n_total - n_q) // 2
        qkv = (x @ w[p + "attn.qkv_proj.weight"].T).reshape(L, n_total, head_dim)
        q = qkv[:, :n_q].transpose(1, 0, 2)  # (n_q, L, hd)
        k = qkv[:, n_q : n_q + n_kv].transpose(1, 0, 2)
        v = qkv[:, n_q + n_kv :].transpose(1, 0, 2)
        if p + "attn.q_norm.weight" in w:
            q = rms_norm(q, w[p + "attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "attn.k_norm.weight"], eps)
        q, k = rope_rotate_half(q, pos, rope_base), rope_rotate_half(k, pos, rope_base)
        group = n_q // n_kv
        out = np.empty_like(q)
        for hq in range(n_q):
            kv = hq // group  # query head hq reads kv head hq // group
            s = q[hq] @ k[kv].T / np.sqrt(head_dim)
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[hq] = (s / s.sum(-1, keepdims=True)) @ v[kv]
        h = h + out.transpose(1, 0, 2).reshape(L, n_q * head_dim) @ w[p + "attn.out_proj.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"], eps)
        y = x @ w[p + "ffn.proj_1.weight"].T
        if y.shape[-1] == 2 * w[p + "ffn.proj_2.weight"].shape[1]:  # GLU: [gate | up]
            gate, up = np.split(y, 2, axis=-1)
            y = act(gate) * up
        else:
            y = act(y)
        h = h + y @ w[p + "ffn.proj_2.weight"].T
        i += 1
    h = rms_norm(h, w["transformer.norm.weight"], eps)
    head = w.get("lm_head.weight", emb)
    return h @ head.T


def greedy(weights, prompt: list[int], n: int, head_dim: int, **kw) -> list[int]:
    """Greedy continuation of ``prompt`` by ``n`` tokens, recomputing the full forward each step."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(np.argmax(forward(weights, tokens, head_dim, **kw)[-1])))
    return tokens[len(prompt) :]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
