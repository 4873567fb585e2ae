"""exp, softmax, SiLU, log-sum-exp and attention for MLX's CPU backend, where ``mx.exp`` is slow.

On Linux x86 the ``mlx[cpu]`` wheel evaluates ``mx.exp`` (and the ``softmax``, ``sigmoid`` and
``logsumexp`` built on it) at about 60 M elements/s — 50× slower than an add, and 6× slower than
``mx.log``. Training and prefill spend a third of their time there: the attention softmax
(heads × L² per layer), the SwiGLU gate (tokens × FFN width per layer) and the cross-entropy over
32,000 logits per token. :func:`exp` here is Cephes' ``expf`` (Cody–Waite range reduction, a
degree-6 polynomial, the exponent written into the float's bits) in plain element-wise MLX ops,
so ``mx.compile`` fuses it into a few vectorised kernels: 4–5× faster than ``mx.exp`` measured
here and *more* accurate (max relative error 8e-8 against float64, vs 3e-6 for ``mx.exp``).

Each function takes the fast path only where it helps: on the CPU (see :func:`enabled`), for
float32 arrays of at least 16K values, and in :func:`attention` for more than one query. Elsewhere
— a GPU (Metal, CUDA), half precision, decoding one token — they return MLX's own ops (and the
fused ``mx.fast.scaled_dot_product_attention``), so nothing changes there. Gradients are exact:
:func:`exp`, :func:`softmax` and :func:`logsumexp` are ``mx.custom_function`` with their analytic
VJPs, so training never differentiates through the bit tricks.

Set ``MLX_OPENELM_FAST_MATH=0`` to use MLX's ops everywhere (for comparisons).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from typing import Any

import mlx.core as mx
from mlx_lm.models.activations import swiglu as _swiglu_mlx
from mlx_lm.models.base import create_causal_mask

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 split so that n · _LN2_HI is exact for |n| < 2^9 (Cody–Waite)
_LN2_LO = -2.12194440e-4
_ROUND = 12582912.0  # 1.5 · 2^23: (y + _ROUND) - _ROUND rounds |y| < 2^22 to an integer
_LO, _HI = -87.0, 88.0  # exp underflows to 0 below _LO (flushed), overflows above ~88.72
_INF_AT = 88.72283935546875  # log(FLT_MAX): above this exp(x) is inf in float32


def enabled() -> bool:
    """True when the fast element-wise path should be used: the default device is the CPU."""
    if os.environ.get("MLX_OPENELM_FAST_MATH", "1") == "0":
        return False
    return mx.default_device().type == mx.DeviceType.cpu


def keep_freed_memory() -> bool:
    """On Linux (glibc), keep freed memory in the process instead of returning it to the OS.

    MLX's CPU allocator gets its buffers from ``malloc``, caching only 32 MB of freed ones. glibc
    serves big requests with a fresh ``mmap`` and hands trimmed heap back with ``munmap``, so
    every large temporary (an FFN activation, a block of logits) faults its pages in again: that
    cost 3–7% of a 270M LoRA step measured here. Fixing the
    mmap threshold at its maximum (32 MB) and trimming only above 1 GB lets ``malloc`` reuse and
    coalesce the memory: the faults go away, and — unlike raising MLX's own cache, which holds
    buffers by size and doubled the resident size here — the process stays at its peak of live
    arrays. Settings made through ``MALLOC_*`` or ``GLIBC_TUNABLES`` are left alone, and so is
    anything but the CPU device. Returns whether it applied them.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if not sys.platform.startswith("linux") or mx.default_device().type != mx.DeviceType.cpu:
        return False
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; musl has none
    except (OSError, AttributeError):
        return False
    _malloc_tuned = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    _malloc_tuned = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and _malloc_tuned
    return _malloc_tuned


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest: bigger requests still get their own mmap
TRIM_THRESHOLD = 1 << 30  # free heap kept before any is handed back
_malloc_tuned = False


def _poly_exp(x: mx.array) -> mx.array:
    """exp(x) for float32 ``x``: Cephes expf. Exact 0 below -87, inf above log(FLT_MAX)."""
    c = mx.minimum(mx.maximum(x, _LO), _HI)
    n = (c * _LOG2E + _ROUND) - _ROUND  # round(c / ln 2), as a float
    r = (c - n * _LN2_HI) - n * _LN2_LO  # c - n·ln 2, |r| ≤ ln 2 / 2
    p = (
        ((((1.9875691500e-4 * r + 1.3981999507e-3) * r + 8.3334519073e-3) * r + 4.1665795894e-2)
         * r + 1.6666665459e-1) * r + 5.0000001201e-1
    )  # fmt: skip
    y = p * (r * r) + r + 1.0  # exp(r)
    # Over- and underflow go into y, so the second kernel is a bare multiply that can write into
    # y's buffer: one temporary (the exponent bits) instead of four.
    y = mx.where(x < _LO, 0.0, mx.where(x > _INF_AT, math.inf, y))  # NaN stays NaN
    two_n = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)  # 2^n, exactly
    return y * two_n


_MIN_SIZE = 1 << 14  # below this the exps are cheap and MLX's single kernel launches win


def _fast(x: mx.array) -> bool:
    """The polynomial path for this float32 array? Half precision keeps MLX's ops, so that
    fp16/bf16 results stay those of mlx-lm (on this CPU backend they are slow anyway); so do
    small arrays (one decoded token's FFN), where a few kernel launches cost more than exp."""
    return x.dtype == mx.float32 and x.size >= _MIN_SIZE and enabled()


_exp_c = mx.compile(_poly_exp)  # one trace per shape: mx.view cannot be compiled shapeless


@mx.custom_function
def _exp(x: mx.array) -> mx.array:
    return _exp_c(x)


@_exp.vjp
def _exp_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return cotangent * output


def exp(x: mx.array) -> mx.array:
    """``mx.exp(x)``; float32 on the CPU goes through the fast polynomial."""
    return _exp(x) if _fast(x) else mx.exp(x)


def sigmoid(x: mx.array) -> mx.array:
    """1 / (1 + e^-x)."""
    return _sigmoid_c(x) if _fast(x) else mx.sigmoid(x)


def silu(x: mx.array) -> mx.array:
    """x · sigmoid(x)."""
    return x * sigmoid(x)


def _sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + _poly_exp(-x))


_sigmoid_c = mx.compile(_sigmoid)


@mx.compile
def _swiglu_forward(gate: mx.array, up: mx.array) -> mx.array:
    return gate * _sigmoid(gate) * up


@mx.compile
def _swiglu_backward(gate: mx.array, up: mx.array, cotangent: mx.array) -> tuple:
    s = _sigmoid(gate)
    return cotangent * up * s * (1.0 + gate * (1.0 - s)), cotangent * gate * s


@mx.custom_function
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return _swiglu_forward(gate, up)


@_swiglu.vjp
def _swiglu_vjp(primals: tuple, cotangent: mx.array, output: mx.array) -> tuple:
    # Recomputes sigmoid(gate) instead of keeping it from the forward pass, so training holds no
    # extra (tokens, FFN width) array per layer.
    return _swiglu_backward(*primals, cotangent)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) · up, the SwiGLU feed-forward non-linearity, as one compiled kernel."""
    return _swiglu(gate, up) if _fast(gate) else _swiglu_mlx(gate, up)


@mx.compile
def _softmax_forward(x: mx.array) -> mx.array:
    """Softmax over the last axis of float32 ``x``; rows of all -inf give 0 (not NaN)."""
    m = mx.max(x, axis=-1, keepdims=True)
    e = _poly_exp(x - mx.where(m == -math.inf, 0.0, m))
    return e / mx.maximum(mx.sum(e, axis=-1, keepdims=True), 1e-30)


@mx.custom_function
def _softmax(x: mx.array) -> mx.array:
    return _softmax_forward(x)


@_softmax.vjp
def _softmax_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True))


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis (``mx.softmax(x, axis=-1, precise=True)``)."""
    return _softmax(x) if _fast(x) else mx.softmax(x, axis=-1, precise=True)


_CHUNK = 1 << 21  # elements per piece (8 MB of float32) for the vocabulary-wide exps


def _rows_in_chunks(fn: Any, *arrays: mx.array) -> mx.array:
    """``fn`` applied to row blocks of (…, V) ``arrays`` (same leading shape), concatenated.

    The polynomial exp runs as a few fused kernels with full-size temporaries between them; over a
    (tokens, 32000) logit matrix those would be several copies of it, so it runs in pieces.
    """
    lead, width = arrays[0].shape[:-1], arrays[0].shape[-1]
    flat = [a.reshape(-1, a.shape[-1]) for a in arrays]
    rows = flat[0].shape[0]
    step = max(1, _CHUNK // max(width, 1))
    if rows <= step:
        out = fn(*flat)
    else:
        out = mx.concatenate([fn(*(a[i : i + step] for a in flat)) for i in range(0, rows, step)])
    return out.reshape(*lead, *out.shape[1:])


@mx.compile
def _lse_rows(x: mx.array) -> mx.array:
    m = mx.max(x, axis=-1, keepdims=True)
    return mx.log(mx.sum(_poly_exp(x - m), axis=-1, keepdims=True)) + m


@mx.compile
def _lse_grad_rows(x: mx.array, lse: mx.array, g: mx.array) -> mx.array:
    return g * _poly_exp(x - lse)  # g · softmax(x)


@mx.custom_function
def _logsumexp(x: mx.array) -> mx.array:
    return _rows_in_chunks(_lse_rows, x).squeeze(-1)


@_logsumexp.vjp
def _logsumexp_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return _rows_in_chunks(_lse_grad_rows, x, output[..., None], cotangent[..., None])


def logsumexp(x: mx.array) -> mx.array:
    """log Σ exp(x) over the last axis, in float32."""
    x = x.astype(mx.float32)
    return _logsumexp(x) if _fast(x) else mx.logsumexp(x, axis=-1)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy, float32: ``logsumexp(logits) - logits[target]``.

    The same numbers as ``mlx.nn.losses.cross_entropy`` (which also uses ``mx.logsumexp``).
    """
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return logsumexp(logits) - picked.astype(mx.float32)


def _mask_array(mask: Any, q_len: int, k_len: int) -> mx.array | None:
    """``mask`` as an array: None stays None, "causal" becomes a bool (q_len, k_len) matrix."""
    if mask is None or isinstance(mask, mx.array):
        return mask
    if mask == "causal":
        return create_causal_mask(q_len, k_len - q_len)
    raise ValueError(f"unsupported attention mask {mask!r}")


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Any = None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` with the softmax above on the CPU.

    Args:
        q: (B, n_q, L, D) queries; k, v: (B, n_kv, S, D) keys and values, ``n_q % n_kv == 0``
            (grouped-query attention without repeating k and v).
        scale: multiplies q·k.
        mask: None, ``"causal"`` (the last L of S positions), or an array broadcastable to
            (B, n_q, L, S): boolean (True = attend) or additive.

    Returns:
        (B, n_q, L, D) in q's dtype. One query (decoding) takes the fused kernel: its exps are
        few, and its key length changes every step (the polynomial is traced per shape).
    """
    if not _fast(q) or q.shape[2] == 1:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return _attention(q, k, v, scale, _mask_array(mask, q.shape[2], k.shape[2]))


_ATTN_WHOLE = 1 << 22  # up to this many attention weights (16 MB of float32): one block
_ATTN_CHUNK = 1 << 20  # otherwise blocks of queries with about this many


def _attention(q: mx.array, k: mx.array, v: mx.array, scale: float, m: Any) -> mx.array:
    """Blocks of queries at a time, so a long prompt's (heads, L, S) weights never exist whole."""
    B, n_q, L, _ = q.shape
    if m is not None:
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)  # (B|1, n_q|1, L|1, S)
    per_query = B * n_q * k.shape[2]
    if L * per_query <= _ATTN_WHOLE:
        return _attention_block(q, k, v, scale, m)
    step = max(1, _ATTN_CHUNK // per_query)
    blocks = []
    for i in range(0, L, step):
        mi = m if m is None or m.shape[2] == 1 else m[:, :, i : i + step]
        blocks.append(_attention_block(q[:, :, i : i + step], k, v, scale, mi))
    return mx.concatenate(blocks, axis=2)


def _attention_block(q: mx.array, k: mx.array, v: mx.array, scale: float, m: Any) -> mx.array:
    B, n_q, L, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    rep = n_q // n_kv
    # Fold each kv head's query heads into the row axis: n_kv matmuls of (rep·L, D) @ (D, S).
    scores = (q * scale).reshape(B, n_kv, rep * L, D) @ k.swapaxes(-1, -2)
    scores = scores.reshape(B, n_kv, rep, L, S)
    if m is not None:
        # (B|1, n_q|1, L|1, S) -> (B|1, n_kv|1, rep|1, L|1, S)
        if m.shape[1] == n_q:
            m = m.reshape(m.shape[0], n_kv, rep, m.shape[2], S)
        else:
            m = m[:, :, None]
        if m.dtype == mx.bool_:
            scores = mx.where(m, scores, -math.inf)
        else:
            scores = scores + m.astype(scores.dtype)
    p = _softmax(scores).reshape(B, n_kv, rep * L, S)
    return (p @ v).reshape(B, n_q, L, D)
