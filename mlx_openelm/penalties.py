"""Logits processors: Hugging Face's repetition penalty, OpenAI's penalties and logit bias.

mlx-lm's repetition penalty looks at a window of the last ``repetition_context_size`` tokens
(20 by default). The penalty in Apple's OpenELM examples is Hugging Face's
``RepetitionPenaltyLogitsProcessor``: every distinct token of the *whole* context, prompt
included, has its logit divided by the penalty when positive and multiplied when negative. Both
are offered, told apart by ``repetition_scope`` (``"context"`` or ``"window"``; the window one is
mlx-lm's own processor).

OpenAI's ``presence_penalty`` / ``frequency_penalty`` count the tokens generated so far (the
completion, as OpenAI and vLLM do, not the prompt): ``logit -= frequency * count +
presence * (count > 0)``. ``logit_bias`` adds a value to chosen token ids (mlx-lm's processor).

Every processor takes ``(history, logits)``: ``history`` is the whole token history, the part an
earlier turn left in the KV cache included (:func:`with_history` prepends it for mlx-lm's loop,
which only sees the tokens it runs), and ``logits`` one row ``(1, V)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from enum import Enum

import mlx.core as mx

from .errors import GenerationError

__all__ = [
    "RepetitionScope",
    "check_penalties",
    "context_repetition_penalty",
    "make_processors",
    "openai_penalties",
    "with_history",
]

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
LOGIT_BIAS_LIMIT = 100.0  # OpenAI accepts biases in [-100, 100]


class RepetitionScope(str, Enum):
    """Which tokens the repetition penalty counts."""

    context = "context"  # Hugging Face / Apple: every token of the prompt and the reply
    window = "window"  # mlx-lm: the last repetition_context_size tokens


def context_repetition_penalty(penalty: float) -> LogitsProcessor:
    """Hugging Face's repetition penalty over every token in ``history``."""

    def process(history: mx.array, logits: mx.array) -> mx.array:
        if history is None or history.size == 0:
            return logits
        chosen = logits[:, history]
        logits[:, history] = mx.where(chosen < 0, chosen * penalty, chosen / penalty)
        return logits

    return process


def openai_penalties(presence: float, frequency: float, start: int) -> LogitsProcessor:
    """OpenAI's presence and frequency penalties over ``history[start:]`` (the completion)."""

    def process(history: mx.array, logits: mx.array) -> mx.array:
        generated = history[start:] if history is not None else None
        if generated is None or generated.size == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype).at[generated].add(1.0)
        return logits - (frequency * counts + presence * (counts > 0).astype(logits.dtype))

    return process


def with_history(processors: list[LogitsProcessor], prefix: Sequence[int]) -> list:
    """The processors seeing ``prefix`` (tokens already in the cache) before their history."""
    if not processors or not prefix:
        return processors
    head = mx.array(list(prefix), dtype=mx.uint32)

    def wrap(p: LogitsProcessor) -> LogitsProcessor:
        return lambda history, logits: p(mx.concatenate([head, history.astype(mx.uint32)]), logits)

    return [wrap(p) for p in processors]


def check_penalties(
    *,
    repetition_penalty: float | None = None,
    repetition_scope: str = RepetitionScope.window,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    vocab_size: int | None = None,
) -> None:
    """Check the penalty options; each problem names the option, the value and the valid range.

    ``logit_bias`` ids are checked against ``vocab_size`` when it is known (a model is loaded).

    Raises:
        GenerationError: the first option out of range.
    """
    if repetition_penalty is not None and not (
        math.isfinite(repetition_penalty) and repetition_penalty > 0
    ):
        raise GenerationError(
            "repetition_penalty (--repetition-penalty) must be > 0 (1 = off; Apple uses 1.2), "
            f"got {repetition_penalty!r}"
        )
    scopes = [s.value for s in RepetitionScope]
    if str(getattr(repetition_scope, "value", repetition_scope)) not in scopes:
        raise GenerationError(
            f"repetition_scope (--repetition-scope) must be one of {scopes}, "
            f"got {repetition_scope!r}"
        )
    for name, value in (("presence", presence_penalty), ("frequency", frequency_penalty)):
        if not (math.isfinite(value) and -2.0 <= value <= 2.0):
            raise GenerationError(
                f"{name}_penalty (--{name}-penalty) must be in [-2, 2] as in OpenAI's API "
                f"(0 = off), got {value!r}"
            )
    for token, bias in (logit_bias or {}).items():
        if not isinstance(token, int) or token < 0 or (vocab_size and token >= vocab_size):
            limit = f"0..{vocab_size - 1}" if vocab_size else ">= 0"
            raise GenerationError(
                f"logit_bias (--logit-bias) names token id {token!r}, outside the vocabulary "
                f"(ids {limit}); use ids from the model's tokenizer"
            )
        if not (math.isfinite(bias) and abs(bias) <= LOGIT_BIAS_LIMIT):
            raise GenerationError(
                f"logit_bias (--logit-bias) for token {token} must be in [-100, 100], got {bias!r}"
            )


def make_processors(
    *,
    start: int,
    repetition_penalty: float | None = None,
    repetition_scope: str = RepetitionScope.window,
    repetition_context_size: int = 20,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
) -> list[LogitsProcessor]:
    """The logits processors for these options, in mlx-lm's order (bias, repetition, OpenAI).

    Args:
        start: where the completion starts in the history the processors will see (the
            presence and frequency penalties count only tokens from there on).
    """
    from mlx_lm.sample_utils import make_logits_processors, make_repetition_penalty

    processors = make_logits_processors(logit_bias=dict(logit_bias)) if logit_bias else []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        if RepetitionScope(repetition_scope) is RepetitionScope.context:
            processors.append(context_repetition_penalty(repetition_penalty))
        else:
            processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    if presence_penalty or frequency_penalty:
        processors.append(openai_penalties(presence_penalty, frequency_penalty, start))
    return processors
