"""Loss-curve PNG from ``metrics.jsonl`` with no plotting dependency.

A chart of two polylines needs neither matplotlib (~40 MB with its dependencies, for one
picture) nor Pillow: this module rasterises into a NumPy array, labels the axes with a 3×5 pixel
font and writes the PNG itself (zlib-compressed rows, CRC'd chunks — the whole format we need).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..folder import atomic_write
from .metrics import read_metrics

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 36, 44
TRAIN_RGB, VALID_RGB = (31, 119, 180), (255, 127, 14)
AXIS_RGB, GRID_RGB = (0, 0, 0), (225, 225, 225)
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", "e": "000111111100111", "a": "000011101101011",
    "d": "001011101101011", "i": "010000010010010", "l": "010010010010010",
    "n": "000110101101101", "o": "000010101101010", "p": "000110101110100",
    "r": "000101110100100", "s": "000011010001110", "t": "010111010010011",
    "v": "000101101101010", " ": "000000000000000",
}  # fmt: skip
_SCALE = 2  # font pixels per glyph pixel


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


def _text(img: np.ndarray, x: int, y: int, text: str, rgb=AXIS_RGB) -> None:
    for i, ch in enumerate(text):
        bits = np.array([int(b) for b in _FONT.get(ch, _FONT[" "])], bool).reshape(5, 3)
        glyph = np.kron(bits, np.ones((_SCALE, _SCALE), bool))
        gx = x + i * 4 * _SCALE
        region = img[y : y + 5 * _SCALE, gx : gx + 3 * _SCALE]
        region[glyph[: region.shape[0], : region.shape[1]]] = rgb


def _line(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, rgb, width: int = 1) -> None:
    for (x0, y0), (x1, y1) in zip(zip(xs[:-1], ys[:-1]), zip(xs[1:], ys[1:])):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        px = np.rint(np.linspace(x0, x1, n)).astype(int)
        py = np.rint(np.linspace(y0, y1, n)).astype(int)
        for d in range(width):
            img[np.clip(py + d, 0, HEIGHT - 1), np.clip(px, 0, WIDTH - 1)] = rgb


def _dots(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, rgb) -> None:
    for x, y in zip(np.rint(xs).astype(int), np.rint(ys).astype(int)):
        img[max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3] = rgb


def render(train: list[tuple[int, float]], valid: list[tuple[int, float]]) -> np.ndarray:
    """The chart as an (H, W, 3) uint8 array: train loss (blue), validation loss (orange)."""
    img = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    points = train + valid
    steps = np.array([s for s, _ in points], float)
    losses = np.array([v for _, v in points], float)
    x_max = max(steps.max(), 1.0)
    lo, hi = losses.min(), losses.max()
    pad = (hi - lo) * 0.05 or 0.5
    lo, hi = lo - pad, hi + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def to_xy(series: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
        s = np.array([p[0] for p in series], float)
        v = np.array([p[1] for p in series], float)
        return LEFT + s / x_max * plot_w, TOP + (hi - v) / (hi - lo) * plot_h

    for i in range(5):  # horizontal grid lines with loss labels
        y = TOP + round(i * plot_h / 4)
        img[y, LEFT : WIDTH - RIGHT] = GRID_RGB
        _text(img, 4, y - 5, f"{hi - i * (hi - lo) / 4:.3g}")
    for i in range(5):  # step labels
        x = LEFT + round(i * plot_w / 4)
        _text(img, x - 8, HEIGHT - BOTTOM + 8, f"{round(i * x_max / 4)}")
    img[TOP : HEIGHT - BOTTOM + 1, LEFT] = AXIS_RGB
    img[HEIGHT - BOTTOM, LEFT : WIDTH - RIGHT] = AXIS_RGB
    _text(img, WIDTH // 2 - 16, HEIGHT - 18, "step")
    _text(img, LEFT, 10, "loss")
    if train:
        _line(img, *to_xy(train), TRAIN_RGB)
    if valid:
        _line(img, *to_xy(valid), VALID_RGB, width=2)
        _dots(img, *to_xy(valid), VALID_RGB)
    for k, (name, rgb) in enumerate((("train", TRAIN_RGB), ("valid", VALID_RGB))):
        x = WIDTH - RIGHT - 150 + k * 76
        img[16:20, x : x + 12] = rgb
        _text(img, x + 16, 13, name, rgb)
    return img


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
