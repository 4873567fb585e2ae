"""Adapter and training settings, and the reports a run sends to its callback.

Pure Python (no MLX import), so the CLI can take its option defaults from here cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..choices import FineTuneType, values
from ..errors import ConfigError

DEFAULT_ITERS = 1000
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
        if self.rank < 1:
            raise ConfigError(f"--rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
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
