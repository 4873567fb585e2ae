"""Loss-curve PNG from ``metrics.jsonl``, drawn by matplotlib (the optional ``[plot]`` extra).

matplotlib draws the chart (real axes, ticks, labels and legend) into an RGB buffer through its
Agg canvas, without pyplot's global state; the small PNG writer here stores it as an 8-bit RGB
file (matplotlib's own ``savefig`` writes RGBA). Without matplotlib, plotting fails with one line
saying how to install the extra.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, MissingDependencyError
from ..folder import atomic_write
from .metrics import read_metrics

WIDTH, HEIGHT, DPI = 720, 420, 100
TRAIN_COLOR, VALID_COLOR = "#1f77b4", "#ff7f0e"  # matplotlib's first two default colours


def require_matplotlib() -> Any:
    """matplotlib's ``Figure`` and Agg canvas classes.

    Raises:
        MissingDependencyError: matplotlib is not installed (with the command that installs it).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError(
            "plotting the loss curve needs the plot extra (matplotlib is not installed): "
            'pip install -e ".[plot]"  (or: pip install "mlx-openelm[plot]")'
        ) from e
    return Figure, FigureCanvasAgg


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB array as a PNG file."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    atomic_write(path, lambda tmp: tmp.write_bytes(png))


def render(train: list[tuple[int, float]], valid: list[tuple[int, float]]) -> np.ndarray:
    """The chart as an (H, W, 3) uint8 array: train loss (blue), validation loss (orange).

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    figure_class, canvas_class = require_matplotlib()
    fig = figure_class(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    canvas = canvas_class(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), color=TRAIN_COLOR, linewidth=1.5, label="train")
    if valid:
        ax.plot(*zip(*valid), color=VALID_COLOR, linewidth=2, marker="o", label="valid")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, color="#e1e1e1")
    ax.legend(loc="upper right")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def plot_metrics(metrics_path: str | Path, output: str | Path) -> Path:
    """Draw train and validation loss from a ``metrics.jsonl`` into a PNG.

    Raises:
        DataError: the metrics file is missing or holds no losses.
    """
    metrics_path = Path(metrics_path)
    if metrics_path.is_dir():
        metrics_path = metrics_path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DataError(f"{metrics_path} does not exist; train with `mlx-openelm lora` first")
    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    finite = [p for p in train + valid if np.isfinite(p[1])]
    if not finite:
        raise DataError(f"{metrics_path} holds no finite losses to plot")
    train = [p for p in train if np.isfinite(p[1])]
    valid = [p for p in valid if np.isfinite(p[1])]
    write_png(output, render(train, valid))
    return Path(output)
