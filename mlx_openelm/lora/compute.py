"""The numerical pieces of training: the loss, evaluation, collectives, gradient checkpointing."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .. import fastmath
from .batching import Batch, make_batch, plan_rows, segment_mask
from .data import Dataset


def loss_sums(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    weights: mx.array,
    segments: mx.array | None = None,
    fused_head: bool = True,
) -> tuple[mx.array, mx.array]:
    """``(sum of trained-token cross-entropies, number of trained tokens)`` for one batch.

    ``segments`` (packed rows) switches to the block-diagonal causal mask; without it the
    model's own causal mask is used. For training (``fused_head``), when the output layer is
    frozen and unquantized, the loss goes through :func:`head_cross_entropy`, which never holds
    the (tokens, vocab) logits; evaluation (no gradient) takes the plain path.
    """
    mask = segment_mask(segments) if segments is not None else None
    head = frozen_head_weight(model) if fused_head else None
    if head is None:
        logits = model(inputs, mask=mask).astype(mx.float32)  # (B, L, vocab)
        ce = fastmath.cross_entropy(logits, targets)
    else:
        ce = head_cross_entropy(model.transformer(inputs, None, mask), head, targets)
    ce = ce * weights
    return ce.sum(), weights.sum()


def frozen_head_weight(model: nn.Module) -> mx.array | None:
    """The output layer's (vocab, dim) weight if it is a plain frozen matrix, else None.

    None for a quantized head (QLoRA), a head with an adapter, or full fine-tuning of the
    embeddings: those take the ordinary logits path.
    """
    if getattr(model.args, "share_input_output_layers", True):
        layer = model.transformer.token_embeddings
        plain = type(layer) is nn.Embedding
    else:
        layer = model.lm_head
        plain = type(layer) is nn.Linear and "bias" not in layer
    if not plain or "weight" in dict(tree_flatten(layer.trainable_parameters())):
        return None
    return layer.weight


HEAD_CHUNK = 1 << 21  # logits per piece (8 MB of float32): 64 tokens of a 32,000 vocabulary


def _head_chunk(h: mx.array, w: mx.array, t: mx.array) -> tuple[mx.array, mx.array]:
    """Cross-entropy of ``h @ w.T`` against ``t`` and its gradient with respect to ``h``."""
    logits = (h @ w.T).astype(mx.float32)  # (n, vocab)
    m = mx.max(logits, axis=-1, keepdims=True)
    e = fastmath.exp(logits - m)
    total = mx.sum(e, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, t[:, None], axis=-1)
    ce = (mx.log(total) + m - picked).squeeze(-1)
    # d ce / d h = (softmax - one_hot(t)) @ w = softmax @ w - w[t]
    grad = ((e / total).astype(w.dtype) @ w).astype(mx.float32) - w[t].astype(mx.float32)
    return ce, grad


@mx.custom_function
def _head_ce(h: mx.array, w: mx.array, t: mx.array) -> tuple[mx.array, mx.array]:
    n = h.shape[0]
    step = max(1, HEAD_CHUNK // w.shape[0])
    parts = [_head_chunk(h[i : i + step], w, t[i : i + step]) for i in range(0, n, step)]
    ce = mx.concatenate([c for c, _ in parts]) if len(parts) > 1 else parts[0][0]
    grad = mx.concatenate([g for _, g in parts]) if len(parts) > 1 else parts[0][1]
    return ce, mx.stop_gradient(grad)


@_head_ce.vjp
def _head_ce_vjp(primals: tuple, cotangents: tuple, outputs: tuple) -> tuple:
    h, w, t = primals
    d_ce = cotangents[0]
    # The weight is frozen (frozen_head_weight checked it): its cotangent is never evaluated.
    return (d_ce[:, None] * outputs[1]).astype(h.dtype), mx.zeros_like(w), mx.zeros_like(t)


def head_cross_entropy(h: mx.array, weight: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy of the logits ``h @ weight.T`` (float32), chunked.

    A fused "linear + cross-entropy": the (tokens, vocab) logits exist only a few tokens at a
    time, and the gradient with respect to ``h`` is formed on the way (softmax − one-hot, times
    the weight), so the backward pass needs neither the logits nor a second exp over the
    vocabulary. The weight must be frozen: no gradient flows to it.
    """
    lead = h.shape[:-1]
    ce, _ = _head_ce(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1))
    return ce.reshape(lead)


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
        s, n = loss_sums(model, *batch_arrays(batch), fused_head=False)
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
