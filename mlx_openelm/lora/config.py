"""Adapter and training settings, and the reports a run sends to its callback.

Pure Python (no MLX import), so the CLI can take its option defaults from here cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..choices import FineTuneType, values
from ..errors import ConfigError

DEFAULT_ITERS = 1000
MAX_RANK = 2**16  # the model bounds it further (see adapters.check_adapter_size)
DEFAULT_TARGETS = ("qkv_proj", "out_proj", "proj_1", "proj_2")
FINE_TUNE_TYPES = values(FineTuneType)


@dataclass(frozen=True, kw_only=True)
class AdapterSpec:
    """What to train: the adapter type, its shape and where it goes.

    ``alpha`` sets the strength: the update is ``(alpha / rank) · B·A`` (PEFT's convention);
    mlx-lm's config stores that product as ``scale``.
    """

    fine_tune_type: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    num_layers: int = -1

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        """Raises ConfigError for an unknown type or out-of-range numbers."""
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ConfigError(
                f"--fine-tune-type {self.fine_tune_type!r} is unknown; choose lora, dora or full"
            )
        if not _int_in(self.rank, 1, MAX_RANK):
            raise ConfigError(_option("rank", f"an integer from 1 to {MAX_RANK}", self.rank))
        if not is_finite_number(self.alpha) or self.alpha == 0:
            raise ConfigError(_option("alpha", "a finite non-zero number", self.alpha))
        if not is_finite_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.num_layers == 0 or self.num_layers < -1:
            raise ConfigError(f"--num-layers must be -1 (all) or positive, got {self.num_layers}")
        if not self.targets:
            raise ConfigError("--targets is empty; name at least one linear layer (e.g. qkv_proj)")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training hyper-parameters (the CLI's defaults come from here)."""

    iters: int | None = None  # optimizer updates; DEFAULT_ITERS unless ``epochs`` is given
    epochs: int | None = None
    batch_size: int = 4  # rows per update: packed sequences, or examples without packing
    grad_accum: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    grad_clip: float | None = None
    grad_checkpoint: bool = False
    seed: int = 0
    max_seq_len: int = 2048
    pack: bool | None = None  # None: pack text data, not chat/completions
    pack_length: int | None = None  # packed row length; None: the longest example (÷32)
    val_every: int = 100
    val_batches: int = -1
    save_every: int = 100
    keep_best: bool = False
    early_stop: int | None = None

    def validate(self) -> None:
        """Raises ConfigError naming the first option that is zero, negative, NaN or absurd."""
        counts = {"batch_size": 2**16, "grad_accum": 2**16, "max_seq_len": 2**20,
                  "val_every": 10**9, "save_every": 10**9}  # fmt: skip
        optional = {"iters": 10**9, "epochs": 10**6, "early_stop": 10**6, "pack_length": 2**20}
        for name, high in {**counts, **optional}.items():
            value = getattr(self, name)
            if (value is not None or name in counts) and not _int_in(value, 1, high):
                raise ConfigError(_option(name, f"an integer from 1 to {high}", value))
        if not _int_in(self.warmup, 0, 10**9):
            raise ConfigError(_option("warmup", "an integer from 0 up", self.warmup))
        if not _int_in(self.seed, 0, 2**63 - 1):
            raise ConfigError(_option("seed", "an integer from 0 to 2**63-1", self.seed))
        if self.val_batches != -1 and not _int_in(self.val_batches, 1, 10**9):
            raise ConfigError(_option("val_batches", "-1 (all) or at least 1", self.val_batches))
        if not is_finite_number(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError(
                _option("learning_rate", "a finite positive number", self.learning_rate)
            )
        if not is_finite_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(_option("weight_decay", "a number ≥ 0", self.weight_decay))
        if self.grad_clip is not None and not (
            is_finite_number(self.grad_clip) and self.grad_clip > 0
        ):
            raise ConfigError(_option("grad_clip", "a positive number", self.grad_clip))
        if self.iters is not None and self.epochs is not None:
            raise ConfigError("give --iters or --epochs, not both")


def _int_in(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def is_finite_number(value: Any) -> bool:
    """A real, finite number: not a bool, a string, NaN or infinity."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _option(name: str, want: str, value: Any) -> str:
    return f"--{name.replace('_', '-')} must be {want}, got {value!r}"


# Settings that do not change the loss curve, so a resumed run may change them.
RESUMABLE_CHANGES = ("val_every", "val_batches", "save_every", "keep_best", "early_stop")


@dataclass(frozen=True, kw_only=True)
class StartReport:
    total_steps: int
    start_step: int
    steps_per_epoch: int
    rows: int
    trainable_parameters: int
    world_size: int
    row_length: int | None = None  # packed row length (None: one example per row)


@dataclass(frozen=True, kw_only=True)
class StepReport:
    step: int
    total_steps: int
    epoch: int
    loss: float
    learning_rate: float
    tokens: int  # useful (non-padding) tokens in this step, all ranks together
    tokens_per_second: float
    peak_memory_gb: float
    elapsed_s: float
    eta_s: float


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    step: int
    split: str
    loss: float
    perplexity: float
    tokens: int
    best: bool = False


@dataclass(frozen=True, kw_only=True)
class SaveReport:
    step: int
    kind: str  # "checkpoint", "best" or "final"
    path: Path


@dataclass(kw_only=True)
class TrainResult:
    adapter_path: Path
    steps: int
    train_loss: float | None = None
    val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    tokens: int = 0
    tokens_per_second: float = 0.0
    peak_memory_gb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


Callback = Callable[[object], None]
