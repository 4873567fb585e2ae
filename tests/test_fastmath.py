"""fastmath: the CPU polynomial exp and what is built on it must match MLX's ops (values and
gradients), keep the edge cases (±inf, NaN, fully masked rows), and step aside when disabled."""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from mlx_openelm import fastmath


@pytest.fixture(autouse=True)
def small_arrays_too(monkeypatch):
    """The fast path normally starts at 16K elements; these tests use small arrays."""
    monkeypatch.setattr(fastmath, "_MIN_SIZE", 0)


def close(a: mx.array, b: mx.array) -> float:
    """Max |a - b| relative to max |b|."""
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_enabled_on_cpu_and_switch_off(monkeypatch):
    assert fastmath.enabled()  # the suite runs on the CPU
    monkeypatch.setenv("MLX_OPENELM_FAST_MATH", "0")
    assert not fastmath.enabled()
    x = mx.random.normal((1000,))
    assert mx.array_equal(fastmath.exp(x), mx.exp(x))  # MLX's own op, bit for bit


def test_only_large_float32_arrays_take_the_polynomial(monkeypatch):
    monkeypatch.setattr(fastmath, "_MIN_SIZE", 1 << 14)
    small, large = mx.random.normal((100,)), mx.random.normal((1 << 15,))
    assert mx.array_equal(fastmath.exp(small), mx.exp(small))
    half = large.astype(mx.float16)
    assert mx.array_equal(fastmath.exp(half), mx.exp(half))
    assert not mx.array_equal(fastmath.exp(large), mx.exp(large))  # another algorithm…
    assert close(fastmath.exp(large), mx.exp(large)) < 1e-5  # …the same numbers
    q = mx.random.normal((1, 4, 1, 64))  # one query: decoding keeps the fused kernel
    k = mx.random.normal((1, 4, 300, 64))
    fused = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.125)
    assert mx.array_equal(fastmath.attention(q, k, k, 0.125), fused)


def test_exp_is_accurate_over_the_float32_range():
    x = np.linspace(-87.0, 88.0, 200_001).astype(np.float32)
    got = np.array(fastmath.exp(mx.array(x)), dtype=np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.abs(got / want - 1).max() < 5e-7  # mx.exp itself is off by up to ~3e-6


def test_exp_edges():
    x = mx.array([-math.inf, -1000.0, -88.0, 89.0, 1000.0, math.inf, math.nan, 0.0])
    got = np.array(fastmath.exp(x))
    assert got[:3].tolist() == [0.0, 0.0, 0.0]  # underflow is exactly 0
    assert np.isposinf(got[3:6]).all()
    assert np.isnan(got[6]) and got[7] == 1.0


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_exp_keeps_half_dtypes(dtype):
    x = mx.random.normal((64,)).astype(dtype)
    y = fastmath.exp(x)
    assert y.dtype == dtype
    assert close(y, mx.exp(x.astype(mx.float32))) < 1e-2


def test_exp_gradient():
    x = mx.random.normal((257,)) * 5
    g = mx.grad(lambda x: (fastmath.exp(x) * mx.arange(257)).sum())(x)
    assert close(g, mx.exp(x) * mx.arange(257)) < 1e-6


def test_softmax_values_gradients_and_masked_rows():
    mx.random.seed(1)
    x = mx.random.normal((3, 5, 77)) * 4
    x = mx.where(mx.random.uniform(shape=x.shape) < 0.3, -math.inf, x)  # partly masked rows
    assert close(fastmath.softmax(x), mx.softmax(x, axis=-1, precise=True)) < 1e-6
    w = mx.random.normal(x.shape)

    def loss(fn):
        return mx.grad(lambda x: (fn(x) * w).sum())(mx.where(mx.isinf(x), -30.0, x))

    assert close(loss(fastmath.softmax), loss(lambda x: mx.softmax(x, axis=-1))) < 1e-5
    dead = fastmath.softmax(mx.full((2, 8), -math.inf))
    assert np.array(dead).tolist() == [[0.0] * 8] * 2  # not NaN


def test_logsumexp_and_cross_entropy_match_mlx(monkeypatch):
    monkeypatch.setattr(fastmath, "_CHUNK", 3 * 500 + 7)  # several ragged row blocks
    mx.random.seed(2)
    logits = mx.random.normal((4, 9, 500)) * 6
    targets = mx.random.randint(0, 500, (4, 9))
    assert close(fastmath.logsumexp(logits), mx.logsumexp(logits, axis=-1)) < 1e-6
    ours = fastmath.cross_entropy(logits, targets)
    theirs = nn.losses.cross_entropy(logits, targets)
    assert close(ours, theirs) < 1e-6
    w = mx.random.uniform(shape=targets.shape)
    g1 = mx.grad(lambda z: (fastmath.cross_entropy(z, targets) * w).sum())(logits)
    g2 = mx.grad(lambda z: (nn.losses.cross_entropy(z, targets) * w).sum())(logits)
    assert close(g1, g2) < 1e-5


def test_swiglu_matches_mlx_lm():
    mx.random.seed(3)
    g, u, w = (mx.random.normal((2, 7, 96)) * 4 for _ in range(3))
    assert close(fastmath.swiglu(g, u), mlx_lm_swiglu(g, u)) < 1e-6

    def grads(fn):
        return mx.grad(lambda g, u: (fn(g, u) * w).sum(), argnums=(0, 1))(g, u)

    for ours, theirs in zip(grads(fastmath.swiglu), grads(mlx_lm_swiglu)):
        assert close(ours, theirs) < 1e-5


def _block_mask(B: int, L: int, S: int) -> mx.array:
    seg = mx.array(np.repeat([1, 1, 2, 3, 3, 3], -(-S // 6))[:S])
    causal = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    same = seg[S - L :][:, None] == seg[None]
    return mx.broadcast_to(mx.logical_and(causal, same)[None, None], (B, 1, L, S))


@pytest.mark.parametrize(
    "mask_kind, L, S",
    [("none", 6, 6), ("causal", 12, 12), ("causal", 3, 12), ("bool", 12, 12),
     ("additive", 12, 12), ("per-head", 12, 12), ("key-padding", 12, 12)],
)  # fmt: skip
@pytest.mark.parametrize("blocks", [False, True])
def test_attention_matches_fused_kernel(mask_kind, L, S, blocks, monkeypatch):
    if blocks:  # queries in blocks of 5 (ragged)
        monkeypatch.setattr(fastmath, "_ATTN_WHOLE", 0)
        monkeypatch.setattr(fastmath, "_ATTN_CHUNK", 2 * 6 * S * 5)
    mx.random.seed(4)
    B, n_q, n_kv, D = 2, 6, 2, 16
    q = mx.random.normal((B, n_q, L, D))
    k, v = mx.random.normal((B, n_kv, S, D)), mx.random.normal((B, n_kv, S, D))
    mask = {
        "none": None,
        "causal": "causal",
        "bool": _block_mask(B, L, S),
        "additive": mx.where(_block_mask(B, L, S), 0.0, -1e9),
        "per-head": mx.broadcast_to(_block_mask(B, L, S), (B, n_q, L, S)),
        "key-padding": mx.arange(S)[None, None, None] < mx.array([S, S - 4])[:, None, None, None],
    }[mask_kind]
    ours = fastmath.attention(q, k, v, 0.25, mask)
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert close(ours, theirs) < 1e-5
    w = mx.random.normal(ours.shape)

    def grads(fn):
        return mx.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2))(q, k, v)

    def fused(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)

    ours_grads = grads(lambda q, k, v: fastmath.attention(q, k, v, 0.25, mask))
    for ours_g, theirs_g in zip(ours_grads, grads(fused)):
        assert close(ours_g, theirs_g) < 1e-4


_FAULTS = """
import resource
import mlx.core as mx
from mlx_openelm import fastmath
applied = fastmath.keep_freed_memory()
x = mx.random.normal((2_000_000,))  # 8 MB
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
def step():  # 24 temporaries alive at once: 192 MB, more than MLX's own 32 MB buffer cache
    mx.eval([x + i for i in range(24)])
mx.eval(x)
start = rss_mb()
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults, rss_mb() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_keeps_temporaries_for_reuse():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)

    def run(env: dict) -> tuple[str, int, float]:
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, check=True,
                             capture_output=True, text=True).stdout.split()  # fmt: skip
        return out[0], int(out[1]), float(out[2])

    # Without the settings, whether glibc hands the 192 MB back after a step depends on what else
    # sits at the top of its heap (in one measured run ~195,000 page faults per 5 steps, in
    # another none), so only the tuned process is asserted: it keeps the memory and reuses it.
    applied, faults, kept = run(env)
    assert applied == "True"
    assert kept > 150, kept
    # Memory handed back and taken again faults on every page: 5 steps x 192 MB = ~245,000 faults.
    # Kept memory faults on almost none (~100 here); under heavy load (13 processes on 2 cores) the
    # kernel's own page work added up to ~2,000 once, so the bound is 2% of the untuned count.
    pages = 5 * 192 * 2**20 // resource.getpagesize()
    assert faults < 0.02 * pages, (faults, pages)
    # A user's own malloc settings win: nothing is changed.
    assert run({**env, "MALLOC_TRIM_THRESHOLD_": "0"})[0] == "False"
