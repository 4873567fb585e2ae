"""Optimizers and learning-rate schedules for fine-tuning.

The schedules are MLX's own (``linear_schedule``, ``cosine_decay``, ``join_schedules``, as in
mlx-lm's trainer). A schedule is a function of the optimizer's own ``step`` counter (part of its
saved state), so a resumed run continues at exactly the learning rate where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim

from ..choices import LRSchedule, OptimizerName, values
from ..errors import ConfigError

SCHEDULES = values(LRSchedule)
OPTIMIZERS = values(OptimizerName)


def make_schedule(
    kind: str, learning_rate: float, total_steps: int, warmup: int = 0
) -> Callable[[mx.array], mx.array]:
    """Learning rate at (0-based) update ``step``.

    A linear warmup over ``warmup`` updates ends at ``learning_rate`` (the first update already
    uses ``learning_rate / warmup``, never 0), then ``constant`` holds it, ``cosine`` and
    ``linear`` decay it towards 0 at ``total_steps``.

    Raises:
        ConfigError: an unknown kind, or a warmup not shorter than the run.
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"--lr-schedule {kind!r} is unknown; choose {', '.join(SCHEDULES)}")
    if warmup < 0 or (warmup and warmup >= total_steps):
        raise ConfigError(
            f"--warmup {warmup} must be between 0 and the number of steps ({total_steps})"
        )
    decay_steps = max(total_steps - warmup, 1)
    if kind == "cosine":
        decay = optim.cosine_decay(learning_rate, decay_steps)
    elif kind == "linear":
        decay = optim.linear_schedule(learning_rate, 0.0, decay_steps)
    else:
        decay = optim.linear_schedule(learning_rate, learning_rate, 1)  # constant
    if not warmup:
        return decay
    # step s < warmup: learning_rate * (s + 1) / warmup, so the first update is not wasted at 0
    warm = optim.linear_schedule(learning_rate / warmup, learning_rate, max(warmup - 1, 1))
    return optim.join_schedules([warm, decay], [warmup])


def build_optimizer(
    name: str,
    schedule: Callable[[mx.array], mx.array],
    weight_decay: float = 0.0,
) -> optim.Optimizer:
    """``adamw`` (decoupled weight decay), ``adam`` or ``sgd`` (L2 weight decay) on ``schedule``.

    Raises:
        ConfigError: an unknown optimizer or a negative weight decay.
    """
    if weight_decay < 0:
        raise ConfigError(f"--weight-decay must be ≥ 0, got {weight_decay}")
    if name == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=weight_decay)
    if name == "adam":
        if weight_decay:
            raise ConfigError("--optimizer adam has no weight decay; use adamw")
        return optim.Adam(learning_rate=schedule)
    if name == "sgd":
        return optim.SGD(learning_rate=schedule, weight_decay=weight_decay)
    raise ConfigError(f"--optimizer {name!r} is unknown; choose {', '.join(OPTIMIZERS)}")
