"""Shared fixtures: tiny random OpenELM model folders with a tiny SentencePiece tokenizer.

Everything is generated here; nothing is downloaded. ``llama2_tokenizer`` points at the real
Llama-2 tokenizer in ``../shared`` and skips (with the reason) when it is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from tiny import random_weights, tiny_config

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA2_TOKENIZER = SHARED / "data" / "llama2-tokenizer" / "tokenizer.model"


def make_model_dir(
    path: Path,
    tokenizer_file: Path,
    *,
    instruct: bool = True,
    seed: int = 0,
    dtype: mx.Dtype = mx.float32,
    **overrides: Any,
) -> Path:
    """Write a tiny random MLX model folder (float32 by default) and return its path."""
    from mlx_openelm.folder import write_model_folder
    from mlx_openelm.tokenizer import ZEPHYR_CHAT_TEMPLATE, Tokenizer

    tok = Tokenizer(tokenizer_file, chat_template=ZEPHYR_CHAT_TEMPLATE if instruct else None)
    cfg = tiny_config(vocab_size=overrides.pop("vocab_size", tok.vocab_size), **overrides)
    weights = random_weights(cfg, seed=seed)
    tensors = ((k, mx.array(v).astype(dtype)) for k, v in weights.items())
    write_model_folder(path, cfg, tensors, tokenizer=tok)
    return path


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory) -> Path:
    """A tiny byte-fallback SentencePiece model (BOS=1, EOS=2) trained on the fly."""
    from spm_fixture import make_tiny_sentencepiece

    return make_tiny_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_spm) -> Path:
    """A tiny instruct-style model folder (Zephyr chat template). Treat it as read-only."""
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-instruct", tiny_spm)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of :func:`tiny_model_dir`, loaded once per test module (the server
    tests share it between the app and their references)."""
    from mlx_openelm.loading import load

    return load(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_base_model_dir(tmp_path_factory, tiny_spm) -> Path:
    """A tiny base model folder (no chat template). Treat it as read-only."""
    return make_model_dir(
        tmp_path_factory.mktemp("models") / "tiny-base", tiny_spm, instruct=False, seed=1
    )


@pytest.fixture(scope="session")
def llama2_tokenizer() -> Path:
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"real Llama-2 tokenizer not at {LLAMA2_TOKENIZER} (../shared absent)")
    return LLAMA2_TOKENIZER


def one_error_line(result: Any, *fragments: str) -> str:
    """Assert a CLI run failed as the house rule says: exit code 1 and exactly one line, on
    stderr, starting with ``Error:`` (no traceback, no blank line from an empty progress
    display), containing every fragment; return that line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == "", result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
