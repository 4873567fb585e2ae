"""Our GPTQ (convert.gptq) against an independent float64 NumPy implementation of the same
algorithm, its clipping search against brute force, and the properties a folder relies on."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm.convert import gptq
from mlx_openelm.convert.learned import pack_codes


def _np_grid(w: np.ndarray, importance: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``w``, the float16-exact (scale, bias) of least importance-weighted error."""
    n_bins = 2**bits - 1
    lo, hi = np.minimum(w.min(1), 0.0), np.maximum(w.max(1), 0.0)
    best = np.full(w.shape[0], np.inf)
    scales, biases = np.zeros(w.shape[0]), np.zeros(w.shape[0])
    for p in gptq.SHRINK:
        s = np.maximum((hi * p - lo * p) / n_bins, 1e-8).astype(np.float16).astype(np.float64)
        b = (lo * p).astype(np.float16).astype(np.float64)
        q = np.clip(np.round((w - b[:, None]) / s[:, None]), 0, n_bins) * s[:, None] + b[:, None]
        err = ((q - w) ** 2 * importance).sum(1)
        better = err < best
        best, scales, biases = (
            np.where(better, err, best),
            np.where(better, s, scales),
            np.where(better, b, biases),
        )
    return scales, biases


def _np_gptq(W: np.ndarray, H: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Textbook GPTQ in float64: damped H, U = chol(H⁻¹)ᵀ, columns left to right, each group's
    grid from its error-updated weights. Returns (quantized W, scales per group)."""
    n_bins = 2**bits - 1
    W = W.astype(np.float64).copy()
    importance = np.diag(H).astype(np.float64)  # the undamped diagonal weighs the grid search
    H = H.astype(np.float64) + gptq.DAMP * np.mean(np.diag(H)) * np.eye(H.shape[0])
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H⁻¹ = Uᵀ U
    Q = np.zeros_like(W)
    all_scales = []
    for i in range(0, W.shape[1], group):
        s, b = _np_grid(W[:, i : i + group], importance[i : i + group], bits)
        all_scales.append(s)
        for k in range(i, i + group):
            q = np.clip(np.round((W[:, k] - b) / s), 0, n_bins) * s + b
            Q[:, k] = q
            e = (W[:, k] - q) / U[k, k]
            W[:, k:] -= np.outer(e, U[k, k:])
    return Q, np.stack(all_scales, 1)


def _problem(seed: int, out: int = 24, cols: int = 128):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(out, cols)).astype(np.float32)
    W[rng.integers(0, out, 6), rng.integers(0, cols, 6)] *= 8  # outliers clipping should drop
    mix = rng.normal(size=(cols, cols)) * 0.3 + np.eye(cols)  # correlated inputs
    X = rng.normal(size=(1024, cols)) @ mix
    H = (X.T @ X / len(X)).astype(np.float32)
    return W, H


def _cost(Q: np.ndarray, W: np.ndarray, H: np.ndarray) -> float:
    """GPTQ's objective: the output error on the calibration inputs, tr(ΔHΔᵀ)."""
    d = (Q - W).astype(np.float64)
    return float(np.trace(d @ H.astype(np.float64) @ d.T))


def test_the_clipping_search_picks_what_brute_force_picks():
    W, H = _problem(0)
    imp = np.diag(H)[:32]
    s, b = gptq.group_grid(mx.array(W[:, :32]), mx.array(imp), bits=3)
    ref_s, ref_b = _np_grid(W[:, :32].astype(np.float64), imp.astype(np.float64), 3)
    np.testing.assert_allclose(np.array(s), ref_s, rtol=1e-6)
    np.testing.assert_allclose(np.array(b), ref_b, rtol=1e-6, atol=1e-7)
    assert (np.array(s) < (W[:, :32].max(1) - np.minimum(W[:, :32].min(1), 0)) / 7).any()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_matches_a_float64_numpy_reference(bits):
    W, H = _problem(bits)
    q, scales, biases = gptq.gptq_weight(mx.array(W), mx.array(H), bits, 32)
    ref_q, ref_scales = _np_gptq(W, H, bits, 32)
    q = np.array(q)
    # float32 vs float64 may flip one rounding, which then propagates along that row only
    same_rows = np.isclose(q, ref_q, rtol=1e-4, atol=1e-5).all(axis=1)
    assert same_rows.sum() >= len(q) - 2, same_rows
    np.testing.assert_allclose(np.array(scales)[:, 0], ref_scales[:, 0], rtol=1e-5)
    assert abs(_cost(q, W, H) / _cost(ref_q, W, H) - 1) < 0.01


def test_gptq_lowers_the_hessian_weighted_error_of_rounding_on_the_same_grids():
    W, H = _problem(7)
    q, scales, biases = gptq.gptq_weight(mx.array(W), mx.array(H), 3, 32)
    s = np.repeat(np.array(scales), 32, axis=1)
    b = np.repeat(np.array(biases), 32, axis=1)
    rtn = np.clip(np.round((W - b) / s), 0, 7) * s + b

    assert _cost(np.array(q), W, H) < 0.7 * _cost(rtn, W, H)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_stored_grids_are_exact_in_the_folder_dtype_and_the_codes_rebuild_the_weights(dtype):
    W, H = _problem(3, out=16, cols=64)
    q, scales, biases = gptq.gptq_weight(mx.array(W), mx.array(H), 3, 32, dtype)
    for a in (scales, biases):
        assert mx.array_equal(a.astype(dtype).astype(mx.float32), a).item()
    packed = pack_codes(q, 3, scales, biases)
    stored = [a.astype(dtype).astype(mx.float32) for a in (scales, biases)]
    back = mx.dequantize(packed, *stored, group_size=32, bits=3).astype(mx.float32)
    np.testing.assert_allclose(np.array(back), np.array(q), rtol=1e-6, atol=1e-6)


def test_an_input_never_seen_in_calibration_gives_finite_codes():
    W, H = _problem(5, out=8, cols=64)
    H[:, 10] = H[10, :] = 0.0  # a feature that is always zero
    q, scales, biases = gptq.gptq_weight(mx.array(W), mx.array(H), 4, 32)
    assert np.isfinite(np.array(q)).all() and np.isfinite(np.array(scales)).all()
