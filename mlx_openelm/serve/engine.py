"""The server's generation worker: one thread owns the model and runs one request at a time.

HTTP handlers :meth:`Engine.submit` a :class:`Job`; the worker runs it through
:func:`mlx_openelm.generate.stream_generate` (reusing the KV cache of a shared prompt prefix,
see :mod:`mlx_openelm.prompt_cache`) and reports each token to the job's ``sink`` as a
:class:`Piece`, then a :class:`Finished` (or a :class:`Failed`). A job whose ``cancelled`` event
is set (its client went away) stops at its next token, or is skipped if it has not started.
At most ``1 + max_queue`` jobs are in the engine at once; more raise :class:`QueueFull`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import OpenELMError
from ..generate import GenerationOptions, stream_generate
from ..prompt_cache import PrefixCache
from .responses import TokenLogprob

__all__ = ["Engine", "Failed", "Finished", "Job", "Piece", "QueueFull"]

log = logging.getLogger("mlx_openelm.server")


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


class QueueFull(Exception):
    """The engine already holds ``1 + max_queue`` jobs."""


@dataclass
class EngineStats:
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    generated_tokens: int = 0


class Engine:
    """Runs jobs one after another on a worker thread (MLX work stays on that one thread)."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_queue: int = 8) -> None:
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.prefix_cache = PrefixCache(model)
        self.stats = EngineStats()
        self._eos = set(getattr(tokenizer, "eos_token_ids", ()) or {tokenizer.eos_token_id})
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._current: Job | None = None
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        return self._pending

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mlx-openelm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job and end the worker (waiting at most ``timeout`` seconds)."""
        if self._thread is None:
            return
        with self._lock:
            for job in list(self._jobs.queue):
                if job is not None:
                    job.cancelled.set()
            if self._current is not None:
                self._current.cancelled.set()
        self._jobs.put(None)
        self._thread.join(timeout)
        self._thread = None

    def submit(self, job: Job) -> None:
        """Queue ``job``.

        Raises:
            QueueFull: ``1 + max_queue`` jobs are already running or waiting.
        """
        with self._lock:
            if self._pending >= 1 + self.max_queue:
                raise QueueFull(f"{self._pending} requests are running or waiting")
            self._pending += 1
        self._jobs.put(job)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._current = job
            try:
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                else:
                    self._run(job)
            except Exception as e:  # reported to the client; the worker must outlive any request
                if not isinstance(e, OpenELMError):  # a bug, not a bad request: keep the traceback
                    log.exception("generation failed")
                self.prefix_cache.clear()
                self.stats.failed += 1
                job.sink(Failed(e))
            finally:
                self._current = None
                with self._lock:
                    self._pending -= 1

    def _run(self, job: Job) -> None:
        cache, reused = self.prefix_cache.take(job.ids)
        held = list(job.ids)  # what the cache holds once each yielded token is fed to the model
        responses = stream_generate(
            self.model,
            self.tokenizer,
            job.ids[reused:],
            options=job.options,
            prompt_cache=cache,
            context=job.ids[:reused],  # prompt lookup and the context-scope penalty see it all
        )
        try:
            for r in responses:
                held.append(r.token)
                self.stats.generated_tokens += 1
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                    return
                job.sink(Piece(r.text, self._logprob(r, job.top_logprobs)))
                if r.finish_reason is not None:
                    self.stats.completed += 1
                    finished = Finished(
                        finish_reason=r.finish_reason,
                        prompt_tokens=len(job.ids),
                        cached_tokens=reused,
                        completion_tokens=r.generation_tokens,
                    )
                    job.sink(finished)
        finally:
            responses.close()
            self.prefix_cache.put(cache, held)

    def _logprob(self, r: Any, k: int | None) -> TokenLogprob | None:
        if k is None or (r.finish_reason == "stop" and r.token in self._eos):
            return None  # like OpenAI, the end-of-sequence token is not listed
        lp = r.logprobs.reshape(-1)
        top: tuple[tuple[int, float], ...] = ()
        if k > 0:
            k = min(k, lp.size)
            idx = mx.argpartition(-lp, kth=k - 1)[:k]
            vals = lp[idx]
            order = mx.argsort(-vals)
            top = tuple(zip(idx[order].tolist(), vals[order].tolist()))
        return TokenLogprob(r.token, lp[r.token].item(), top)
