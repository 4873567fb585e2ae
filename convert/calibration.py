"""Calibration text for the quality probe and for learned quantization (never downloaded).

A user's ``--calibration FILE`` (plain text, or JSONL of ``{"text": ...}`` lines, read by
``mlx_openelm.evaluate.read_texts``) is tokenized document by document (BOS first, as the model
was trained) and concatenated; learned methods take ``samples`` windows of ``seq_len`` tokens
spread evenly over it, so the whole file is represented and no seed is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_openelm.errors import DataError
from mlx_openelm.evaluate import read_texts

DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 256


def calibration_ids(
    path: str | Path, tokenizer: Any, vocab_size: int, limit: int | None = None
) -> list[int]:
    """The token ids of a calibration file (ids the model cannot embed are dropped).

    ``limit`` stops tokenizing once that many ids are read (None: the whole file).

    Raises:
        DataError: the file is missing, empty, not UTF-8 or malformed JSONL.
    """
    ids: list[int] = []
    for text in read_texts(path):
        ids.extend(i for i in tokenizer.encode(text) if i < vocab_size)
        if limit is not None and len(ids) >= limit:
            break
    return ids[:limit]


def calibration_windows(
    path: str | Path,
    tokenizer: Any,
    vocab_size: int,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> mx.array:
    """``samples`` windows of ``seq_len`` tokens, evenly spaced over the file: (samples, seq_len).

    Raises:
        DataError: the file is unreadable, or holds fewer than ``samples × seq_len`` tokens.
    """
    if samples < 1 or seq_len < 2:
        raise DataError(
            f"--calibration-samples must be >= 1 and the window >= 2 tokens, got {samples}"
        )
    ids = calibration_ids(path, tokenizer, vocab_size)
    need = samples * seq_len
    if len(ids) < need:
        fit = len(ids) // seq_len
        hint = f"pass --calibration-samples {fit} or " if fit else ""
        raise DataError(
            f"calibration file {path} holds {len(ids)} tokens, too few for {samples} samples of "
            f"{seq_len} tokens ({need}); {hint}use a longer file"
        )
    step = (len(ids) - seq_len) // max(samples - 1, 1)
    windows = [ids[i * step : i * step + seq_len] for i in range(samples)]
    return mx.array(windows)  # (samples, seq_len)
