"""mlx-openelm: run, convert and fine-tune Apple's OpenELM models with MLX."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

# Cheap to import: mlx-lm (seconds, through transformers) loads on the first call.
from .generate import generate, stream_generate

try:
    __version__ = version("mlx-openelm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "generate", "load", "stream_generate"]


def __getattr__(name: str) -> Any:
    # `load` imports the model, hence mlx-lm: only when it is first used, so that
    # `import mlx_openelm` (and every CLI command) stays fast.
    if name == "load":
        from .loading import load

        return load
    raise AttributeError(f"module 'mlx_openelm' has no attribute {name!r}")
