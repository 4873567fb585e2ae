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
The options are checked by :class:`~.generate_options.GenerationOptions`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import mlx.core as mx

__all__ = [
    "context_repetition_penalty",
    "make_processors",
    "openai_penalties",
    "with_history",
]

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


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


def make_processors(
    *,
    start: int,
    repetition_penalty: float | None = None,
    repetition_scope: str = "window",
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
        if repetition_scope == "context":
            processors.append(context_repetition_penalty(repetition_penalty))
        else:
            processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    if presence_penalty or frequency_penalty:
        processors.append(openai_penalties(presence_penalty, frequency_penalty, start))
    return processors
