"""The numerical pieces of training: the loss, evaluation, collectives, gradient checkpointing."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .batching import Batch, make_batch, plan_rows, segment_mask
from .data import Dataset


def loss_sums(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    weights: mx.array,
    segments: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """``(sum of trained-token cross-entropies, number of trained tokens)`` for one batch.

    ``segments`` (packed rows) switches to the block-diagonal causal mask; without it the
    model's own causal mask is used.
    """
    mask = segment_mask(segments) if segments is not None else None
    logits = model(inputs, mask=mask).astype(mx.float32)  # (B, L, vocab)
    ce = nn.losses.cross_entropy(logits, targets) * weights
    return ce.sum(), weights.sum()


def batch_arrays(batch: Batch) -> tuple:
    """The batch as MLX arrays, in :func:`loss_sums`'s argument order."""
    seg = None if batch.segments is None else mx.array(batch.segments)
    return mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.weights), seg


def all_sum(world: mx.distributed.Group, values: list[mx.array], grads: dict | None = None):
    """Sum scalars (and a gradient tree) over all ranks in one collective.

    Returns:
        ``(values, grads)`` summed; unchanged for a single process.
    """
    if world.size() == 1:
        return values, grads
    flat = tree_flatten(grads) if grads is not None else []
    parts = [v.reshape(1).astype(mx.float32) for v in values] + [g.reshape(-1) for _, g in flat]
    total = mx.distributed.all_sum(mx.concatenate(parts), stream=mx.cpu)
    n = len(values)
    summed, offset = [], n
    for name, g in flat:
        summed.append((name, total[offset : offset + g.size].reshape(g.shape).astype(g.dtype)))
        offset += g.size
    return [total[i] for i in range(n)], (tree_unflatten(summed) if grads is not None else None)


def evaluate(
    model: nn.Module,
    data: Dataset,
    batch_size: int,
    max_seq_len: int,
    pack: bool,
    max_batches: int = -1,
) -> tuple[float, int]:
    """Mean token loss over ``data`` (its first ``max_batches`` batches; -1 = all) and its tokens.

    Data-parallel: each rank takes every ``size``-th row and the sums are combined.
    """
    world = mx.distributed.init()
    rows = plan_rows(data.examples, max_seq_len, pack)
    if max_batches > 0:
        rows = rows[: max_batches * batch_size]
    mine = rows[world.rank() :: world.size()]
    per_rank = max(batch_size // world.size(), 1)
    total, count = mx.array(0.0), mx.array(0.0)
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), per_rank):
        batch = make_batch(data.examples, mine[i : i + per_rank], max_seq_len, pack)
        s, n = loss_sums(model, *batch_arrays(batch))
        total, count = total + s, count + n
        mx.eval(total, count)
    model.train(was_training)
    (total, count), _ = all_sum(world, [total, count])
    tokens = int(count.item())
    return (total.item() / tokens if tokens else float("nan")), tokens


class _Checkpointed:
    """Mixed into a block's class by :func:`set_grad_checkpoint`: recompute it in backward."""

    def __call__(self, x, mask=None, cache=None):
        block_call = type(self).__mro__[2].__call__  # the original block class's __call__

        def run(params, h, *m):
            self.update(params)
            return block_call(self, h, m[0] if m else mask, cache)

        extra = (mask,) if isinstance(mask, mx.array) else ()
        return mx.checkpoint(run)(self.trainable_parameters(), x, *extra)


def set_grad_checkpoint(model: nn.Module, on: bool) -> None:
    """Turn gradient checkpointing of ``model``'s blocks on or off (this model only)."""
    for layer in model.layers:
        cls = type(layer)
        if on and not issubclass(cls, _Checkpointed):
            layer.__class__ = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})
        elif not on and issubclass(cls, _Checkpointed):
            layer.__class__ = cls.__mro__[2]
