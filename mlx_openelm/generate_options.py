"""Generation options: their defaults, their validation, and stop strings.

The defaults live here once; the CLI's option defaults and :func:`~.generate.stream_generate`
read them. :func:`validate_options` checks every option with an actionable message, and
:class:`StopMatcher` cuts streamed text at stop strings without ever showing part of one. Pure
Python (no MLX or mlx-lm import), so it is cheap to import; :mod:`mlx_openelm.generate`
re-exports all of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import GenerationError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MIN_P",
    "DEFAULT_NUM_DRAFT",
    "DEFAULT_REPETITION_CONTEXT",
    "DEFAULT_TEMP",
    "DEFAULT_TOP_K",
    "DEFAULT_TOP_P",
    "KV_BITS",
    "StopMatcher",
    "validate_options",
]

# Defaults in one place: the CLI's option defaults read these.
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0
DEFAULT_MIN_P = 0.0
DEFAULT_REPETITION_CONTEXT = 20
DEFAULT_NUM_DRAFT = 3
KV_BITS = (2, 3, 4, 5, 6, 8)


def validate_options(
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = DEFAULT_TEMP,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = DEFAULT_TOP_K,
    min_p: float = DEFAULT_MIN_P,
    repetition_penalty: float | None = None,
    repetition_context_size: int = DEFAULT_REPETITION_CONTEXT,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT,
    stop: Sequence[str] | None = None,
) -> None:
    """Check generation options; each problem names the option, the value and a valid range.

    Raises:
        GenerationError: the first option that is out of range.
    """
    checks = [
        (max_tokens > 0, "max_tokens (--max-tokens)", max_tokens, "a positive integer"),
        (math.isfinite(temp) and temp >= 0, "temp (--temp)", temp, ">= 0 (0 = greedy)"),
        (0 < top_p <= 1, "top_p (--top-p)", top_p, "in (0, 1] (1 = off)"),
        (top_k >= 0, "top_k (--top-k)", top_k, ">= 0 (0 = off)"),
        (0 <= min_p <= 1, "min_p (--min-p)", min_p, "in [0, 1] (0 = off)"),
        (
            repetition_penalty is None or repetition_penalty > 0,
            "repetition_penalty (--repetition-penalty)",
            repetition_penalty,
            "> 0 (1 = off; 1.1-1.3 discourages repeats)",
        ),
        (
            repetition_context_size > 0,
            "repetition_context_size (--repetition-context-size)",
            repetition_context_size,
            "a positive integer",
        ),
        (max_kv_size is None or max_kv_size > 0, "max_kv_size (--max-kv-size)", max_kv_size, "> 0"),
        (
            kv_bits is None or kv_bits in KV_BITS,
            "kv_bits (--kv-bits)",
            kv_bits,
            f"one of {KV_BITS}",
        ),
        (num_draft_tokens > 0, "num_draft_tokens (--num-draft)", num_draft_tokens, "> 0"),
    ]
    for ok, name, value, valid in checks:
        if not ok:
            raise GenerationError(f"{name} must be {valid}, got {value!r}")
    if kv_bits is not None and max_kv_size is not None:
        raise GenerationError(
            "kv_bits (--kv-bits) cannot be combined with max_kv_size (--max-kv-size): mlx-lm "
            "cannot quantize a rotating cache; drop one of them"
        )
    for s in stop or ():
        if not isinstance(s, str) or not s:
            raise GenerationError(f"stop strings (--stop) must be non-empty text, got {s!r}")


class StopMatcher:
    """Cuts streamed text at the first stop string and holds back text that could start one.

    ``push(piece)`` returns ``(text_safe_to_show, stopped)``; ``flush()`` releases the held text
    when generation ends without a stop.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = list(stops)
        self._held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        text = self._held + piece
        # No stop string can start in text already released: that text ends in no stop prefix.
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = max((self._partial(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """Length of the longest proper prefix of ``stop`` that ``text`` ends with."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0
