"""GPTQ for OpenELM: error-feedback rounding with clipped, float16-exact group grids.

mlx-lm's ``gptq_quantize`` (``mlx_lm/quant/gptq.py``) is the reference this follows (Frantar et
al., 2022: Hessians ``H = Σ xᵀx`` from calibration activations, columns rounded left to right,
each rounding error pushed onto the columns not yet rounded through the upper Cholesky factor of
``H⁻¹``). It is rebuilt here for three reasons, each measured on the trained checkpoint
(``benchmarks/RESULTS.md``, *Quantization*):

- **Clipping.** mlx-lm takes each group's grid from its min and max. At 2-3 bits one outlier
  then wastes most of the levels; here every group picks, from a grid of shrink factors, the
  range whose rounding error weighted by the Hessian's diagonal (how much each input matters) is
  smallest — GPTQ's own ``mse`` option, Hessian-weighted.
- **Stored grids.** The folder keeps scales and biases in float16. mlx-lm rounds with the float32
  grid, then stores a different one; here the grid is made float16-exact first, so the codes are
  rounded on the grid that will be used.
- **Memory traffic.** mlx-lm updates the whole weight matrix after every column (a full copy of a
  (24576, 3072) matrix 3,072 times for 3B's ``proj_1``); here a group's columns are updated in a
  (out, group_size) block and the rest once per group, which made GPTQ of 3B-shaped layers
  finish on a CPU at all.

Any bit width MLX packs (2, 3, 4, 6, 8) works: the codes go through ``learned.pack_codes``.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

DAMP = 0.01  # of the mean Hessian diagonal, as mlx-lm and the GPTQ paper
SHRINK = tuple(1.0 - 0.025 * i for i in range(21))  # ranges tried per group: 100% .. 50%


class HessianCatcher(nn.Module):
    """Wraps a linear layer and accumulates ``Σ xᵀx`` over its inputs (float32)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.H = mx.zeros((module.weight.shape[1],) * 2, dtype=mx.float32)
        self.rows = 0

    def __call__(self, x: mx.array) -> mx.array:
        xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)  # (tokens, in)
        self.H = self.H + xf.T @ xf
        self.rows += xf.shape[0]
        return self.module(x)


def collect_hessians(
    model: nn.Module, data: mx.array, batch_size: int, on_batch: Callable[[], None] | None = None
) -> dict[str, tuple[nn.Module, mx.array]]:
    """Run ``data`` through ``model`` and return ``{path: (linear, H)}`` for every ``nn.Linear``.

    ``H`` is averaged over the tokens (the scale does not change GPTQ, it keeps float32 sane).
    """
    catchers = [
        (p, HessianCatcher(m))
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if type(m) is nn.Linear
    ]
    model.update_modules(tree_unflatten(catchers))
    for s in range(0, data.shape[0], batch_size):
        model(data[s : s + batch_size])
        mx.eval([c.H for _, c in catchers])
        if on_batch is not None:
            on_batch()
    model.update_modules(tree_unflatten([(p, c.module) for p, c in catchers]))
    return {p: (c.module, c.H / max(c.rows, 1)) for p, c in catchers}


def _inverse_factor(H: mx.array, W: mx.array) -> tuple[mx.array, mx.array]:
    """The upper Cholesky factor of the damped ``H⁻¹``; inputs never seen get weight 0."""
    with mx.stream(mx.cpu):  # MLX's linalg runs on the CPU only
        diag = mx.diag(H)
        dead = diag <= 0
        H = H + mx.diag(mx.where(dead, 1.0, 0.0) + DAMP * mx.mean(diag))
        W = mx.where(dead[None, :], 0.0, W)
        L = mx.linalg.cholesky(H)
        U = mx.linalg.cholesky(mx.linalg.cholesky_inv(L), upper=True)
    return U, W


def group_grid(
    w: mx.array, importance: mx.array, bits: int, dtype: mx.Dtype = mx.float16
) -> tuple[mx.array, mx.array]:
    """Scales and biases (out,) of one group ``w`` (out, group): the clipped range of smallest
    importance-weighted squared rounding error, exact in ``dtype``."""
    n_bins = 2**bits - 1
    lo, hi = mx.minimum(w.min(axis=1), 0.0), mx.maximum(w.max(axis=1), 0.0)
    shrink = mx.array(SHRINK)[:, None]  # (S, 1)
    scales, biases = _grid(lo * shrink, hi * shrink, n_bins, dtype)  # (S, out)
    q = mx.clip(mx.round((w[None] - biases[..., None]) / scales[..., None]), 0, n_bins)
    err = ((q * scales[..., None] + biases[..., None] - w[None]) ** 2 * importance).sum(-1)
    best = mx.argmin(err, axis=0)[None]  # (1, out)
    pick = lambda a: mx.take_along_axis(a, best, axis=0)[0]  # noqa: E731
    return pick(scales), pick(biases)


def _grid(lo: mx.array, hi: mx.array, n_bins: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    scales = mx.maximum((hi - lo) / n_bins, 1e-8).astype(dtype).astype(mx.float32)
    biases = lo.astype(dtype).astype(mx.float32)
    return scales, biases


def gptq_weight(
    W: mx.array, H: mx.array, bits: int, group_size: int, dtype: mx.Dtype = mx.float16
) -> tuple[mx.array, mx.array, mx.array]:
    """GPTQ of one weight ``W`` (out, in) given its input Hessian ``H`` (in, in).

    Returns:
        The rounded-and-compensated weight (on the grid), and the scales and biases
        (out, in / group_size), float32 values exact in ``dtype``.
    """
    n_bins = 2**bits - 1
    U, W = _inverse_factor(H, W.astype(mx.float32))
    importance = mx.diag(H)
    cols = W.shape[1]
    out_q, all_scales, all_biases = [], [], []
    for i in range(0, cols, group_size):
        j = i + group_size
        Wg = W[:, i:j]
        scales, biases = group_grid(Wg, importance[i:j], bits, dtype)
        s, b = scales[:, None], biases[:, None]
        Ug = U[i:j, i:j]
        errs, done = [], []
        for k in range(group_size):
            w = Wg[:, k : k + 1]
            q = mx.clip(mx.round((w - b) / s), 0, n_bins) * s + b
            e = (w - q) / Ug[k, k]
            Wg = Wg - e @ Ug[k : k + 1, :]  # U is upper: columns < k are untouched
            errs.append(e)
            done.append(q)
        E = mx.concatenate(errs, axis=1)  # (out, group)
        if j < cols:
            W = mx.concatenate([W[:, :j], W[:, j:] - E @ U[i:j, j:]], axis=1)
        out_q.append(mx.concatenate(done, axis=1))
        all_scales.append(scales)
        all_biases.append(biases)
        mx.eval(W, out_q[-1], scales, biases)
    return mx.concatenate(out_q, axis=1), mx.stack(all_scales, 1), mx.stack(all_biases, 1)
