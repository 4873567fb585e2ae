"""One request's decoding state inside the server's batch: its text, stop strings, logprobs.

mlx-lm's ``BatchGenerator`` hands back token ids; :class:`Sequence` turns each into the same
:class:`Piece` that ``mlx_openelm.generate.stream_generate`` would give for that request alone
(the same streaming detokenizer, the same stop-string matching, EOS ends with "stop" and is not
shown, ``max_tokens`` ends with "length"), and at the end a :class:`Finished`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..generate import GenerationOptions, StopMatcher
from .responses import TokenLogprob

__all__ = ["Event", "Failed", "Finished", "Job", "Piece", "Sequence"]


@dataclass(frozen=True)
class Piece:
    """One generated token: the text it releases (may be empty) and its logprobs if asked."""

    text: str
    logprob: TokenLogprob | None = None


@dataclass(frozen=True, kw_only=True)
class Finished:
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Piece | Finished | Failed


@dataclass(kw_only=True)
class Job:
    """A prompt to complete with ``options`` (their ``max_tokens`` already fits the context)."""

    ids: list[int]
    options: GenerationOptions
    sink: Callable[[Event], None]
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token and k others
    cancelled: threading.Event = field(default_factory=threading.Event)


class Sequence:
    """A job in the batch: ``push(token, logprobs)`` per generated token reports a Piece (and
    at the end a Finished) to the job's sink and says whether the sequence has ended."""

    def __init__(self, job: Job, detokenizer: Any, eos: set[int], reused: int) -> None:
        self.job, self.reused, self._eos = job, reused, eos
        self._detok, self._stops = detokenizer, StopMatcher(job.options.stop)
        self.generated = 0

    def push(self, token: int, logprobs: mx.array) -> bool:
        self.generated += 1
        finish = None
        if token in self._eos:
            finish = "stop"
        else:
            self._detok.add_token(token)
            if self.generated >= self.job.options.max_tokens:
                finish = "length"
        if finish is not None:
            self._detok.finalize()
        text, stopped = self._stops.push(self._detok.last_segment)
        if stopped:
            finish = "stop"
        elif finish is not None:
            text += self._stops.flush()
        is_eos = finish == "stop" and token in self._eos
        logprob = None if is_eos else logprob_of(token, logprobs, self.job.top_logprobs)
        self.job.sink(Piece(text, logprob))
        if finish is not None:
            self.job.sink(self.finished(finish))
        return finish is not None

    def finished(self, reason: str) -> Finished:
        return Finished(
            finish_reason=reason,
            prompt_tokens=len(self.job.ids),
            cached_tokens=self.reused,
            completion_tokens=self.generated,
        )


def logprob_of(token: int, logprobs: mx.array, k: int | None) -> TokenLogprob | None:
    """The chosen token's logprob and the ``k`` likeliest (None when logprobs were not asked)."""
    if k is None:
        return None
    lp = logprobs.reshape(-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        k = min(k, lp.size)
        idx = mx.argpartition(-lp, kth=k - 1)[:k]
        vals = lp[idx]
        order = mx.argsort(-vals)
        top = tuple(zip(idx[order].tolist(), vals[order].tolist()))
    return TokenLogprob(token, lp[token].item(), top)
