"""The server's generation worker: one thread owns the model and decodes requests together.

HTTP handlers :meth:`Engine.submit` a :class:`Job`. The worker runs continuous batching on
mlx-lm's ``BatchGenerator``: between two decoding steps, waiting jobs join the running batch (up
to ``max_batch`` sequences; their prompts are prefilled alongside the decoding) and finished or
cancelled ones leave it. Each job keeps its own sampler and logits processors, starts from the
KV cache of its longest cached prompt prefix (:mod:`mlx_openelm.prompt_cache`) and reports each
token to its ``sink`` as a :class:`Piece`, then a :class:`Finished` (or a :class:`Failed`). A
job whose ``cancelled`` event is set (its client went away) leaves the batch before the next
step, or is dropped from the queue if it has not started. An idle engine waits a few
milliseconds after a request for others arriving with it, so a burst is prefilled together.
At most ``max_batch + max_queue`` jobs are in the engine at once; more raise
:class:`QueueFull`.

A seeded sampling request (``seed`` with ``temperature > 0``) runs alone through
:func:`mlx_openelm.generate.stream_generate`, once the batch ahead of it has drained: MLX has
one random state, so only alone is its reply the one ``generate`` gives for that seed.

Prompt lookup (``prompt_lookup_num_tokens``) is a one-sequence speed-up: its verification passes
have a different length each step, which a batch cannot share. A request with it that arrives
at an idle engine (nothing running, nothing else waiting: one user and one app, the common case
on a laptop) runs alone with lookup. When another request arrives while it runs, it hands off
after the current token: the tokens so far and their KV cache join the batch, the same
:class:`Sequence` goes on (its text, stop strings and counts), the request finishes there
plainly and the newcomer joins at once instead of waiting for the whole reply. A lookup request
that arrives while others run joins the batch and decodes plainly. Greedy replies are the same
tokens on every path.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import OpenELMError
from ..generate import _for_mlx_lm, stream_generate
from ..lookup import LookupStats
from ..prompt_cache import DEFAULT_CACHE_BYTES, PrefixCache
from .schema import DEFAULT_MAX_BATCH
from .sequence import Event, Failed, Finished, Job, Piece, Sequence

__all__ = ["DEFAULT_MAX_BATCH", "Engine", "Event", "Failed", "Finished", "Job", "Piece"]
__all__ += ["QueueFull"]

log = logging.getLogger("mlx_openelm.server")

PREFILL_STEP = 512  # prompt tokens per sequence per step: a long prompt does not stall decoding
GATHER_QUIET_S, GATHER_MAX_S = 0.005, 0.05  # an idle engine's wait for a burst (see _gather)


class QueueFull(Exception):
    """The engine already holds ``max_batch + max_queue`` jobs."""


@dataclass
class EngineStats:
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    generated_tokens: int = 0
    solo: int = 0  # jobs run alone (seeded sampling, a KV-cache option, or prompt lookup)
    lookup: int = 0  # of those, jobs decoded with prompt lookup
    handed_off: int = 0  # lookup jobs that went on in the batch when another arrived
    lookup_proposed: int = 0  # candidate tokens prompt lookup proposed, over all jobs
    lookup_accepted: int = 0  # and how many of them the model accepted
    batch_steps: int = 0
    peak_batch: int = 0  # the most sequences decoded in one step


def runs_alone(job: Job) -> bool:
    """Whether ``job`` needs the model to itself (see the module docstring)."""
    o = job.options
    return (o.seed is not None and o.temp > 0) or o.max_kv_size is not None or o.kv_bits is not None


def uses_lookup(job: Job) -> bool:
    """Whether ``job`` asks for prompt lookup (alone if the engine is idle, else plainly)."""
    return job.options.prompt_lookup_num_tokens is not None


class Engine:
    """Decodes jobs in one batch on a worker thread (MLX work stays on that one thread)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_queue: int = 8,
        max_batch: int = DEFAULT_MAX_BATCH,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.max_batch = max_queue, max_batch
        self.prefix_cache = PrefixCache(model, max_bytes=cache_bytes)
        self.stats = EngineStats()
        self._eos = set(getattr(tokenizer, "eos_token_ids", ()) or {tokenizer.eos_token_id})
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._pending = 0
        self._running: dict[int, Sequence] = {}  # the batch's uid -> sequence
        self._solo: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return bool(self._running) or self._solo is not None

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        return self._pending

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mlx-openelm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job and end the worker (waiting at most ``timeout`` seconds)."""
        if self._thread is None:
            return
        with self._wake:
            self._stopping = True
            for job in [*self._waiting, *(s.job for s in list(self._running.values()))]:
                job.cancelled.set()
            if self._solo is not None:
                self._solo.cancelled.set()
            self._wake.notify()
        self._thread.join(timeout)
        self._thread = None

    def submit(self, job: Job) -> None:
        """Queue ``job``; it joins the batch at the next step with room.

        Raises:
            QueueFull: ``max_batch + max_queue`` jobs are already running or waiting.
        """
        with self._wake:
            if self._pending >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self._pending} requests are running or waiting")
            self._pending += 1
            self._waiting.append(job)
            self._wake.notify()

    def _done(self, job: Job) -> None:
        with self._wake:
            self._pending -= 1

    # --- The worker -----------------------------------------------------------------------

    def _loop(self) -> None:
        from mlx_lm.generate import BatchGenerator

        stream = mx.default_stream(mx.default_device())  # this thread's: all MLX work runs here
        gen = None
        while True:
            with self._wake:
                if not self._running:
                    self._gather()
                if self._stopping and not self._running:
                    break
            if gen is None:
                gen = BatchGenerator(
                    self.model, stop_tokens=[[t] for t in self._eos],
                    completion_batch_size=self.max_batch, prefill_batch_size=self.max_batch,
                    prefill_step_size=PREFILL_STEP, stream=stream,
                )  # fmt: skip
            try:
                self._admit(gen)
                self._drop_cancelled(gen)
                if self._running:
                    self._step(gen)
            except Exception as e:  # the worker must outlive any request
                self._fail_batch(e)
                gen = None  # its state is unknown: start a fresh one
        if gen is not None:
            gen.close()

    def _gather(self) -> None:
        """Wait (holding ``_wake``) for a job; then for the rest of a burst arriving with it, so
        their prompts are prefilled together rather than one step apart: until no job has come
        for ``GATHER_QUIET_S``, at most ``GATHER_MAX_S``."""
        while not self._stopping and not self._waiting:
            self._wake.wait()
        deadline = time.monotonic() + GATHER_MAX_S
        while not self._stopping and len(self._waiting) < self.max_batch:
            seen = len(self._waiting)
            self._wake.wait(min(GATHER_QUIET_S, max(deadline - time.monotonic(), 0)))
            if len(self._waiting) == seen or time.monotonic() >= deadline:
                return

    def _admit(self, gen: Any) -> None:
        """Move waiting jobs into the batch while it has room (a job that must run alone
        waits, holding the queue, until the batch has drained, then runs)."""
        while True:
            with self._wake:
                alive = [job for job in self._waiting if not job.cancelled.is_set()]
                if len(alive) < len(self._waiting):  # hung up while waiting: never started
                    gone = len(self._waiting) - len(alive)
                    self.stats.cancelled += gone
                    self._pending -= gone
                    self._waiting = collections.deque(alive)
                if not self._waiting or len(self._running) >= self.max_batch:
                    return
                job = self._waiting[0]
                if runs_alone(job) and self._running:
                    return
                lookup = uses_lookup(job) and not self._running and len(self._waiting) == 1
                self._waiting.popleft()
            if runs_alone(job):
                self._run_alone(job)
            elif lookup:
                self._run_alone(job, gen)
            else:
                self._insert(gen, job)

    def _checked(self, job: Job) -> Any:
        """The job's options, validated (a bad one fails the job: None)."""
        try:
            options = job.options.validate()
            options.check_logit_bias(int(self.model.args.vocab_size))
            return options
        except Exception as e:
            self._fail(job, e)
            return None

    def _insert(
        self, gen: Any, job: Job, handed: tuple[Sequence, list[int], Any] | None = None
    ) -> None:
        """Add ``job`` to the batch; ``handed``: the sequence, tokens so far and their cache of a
        job that ran alone with prompt lookup until now (see :meth:`_run_alone`)."""
        options = self._checked(job)
        if options is None:
            return
        seq, ids, held = handed if handed is not None else (None, job.ids, None)
        try:
            processors = options.logits_processors(start=len(job.ids), tokenizer=self.tokenizer)
        except Exception as e:
            self._fail(job, e)
            return
        try:
            cache, reused = held if held is not None else self.prefix_cache.take(ids)
            (uid,) = gen.insert(
                [ids[reused:]],
                max_tokens=[options.max_tokens - (seq.generated if seq else 0)],
                caches=[cache],
                all_tokens=[ids[:reused]],  # the processors see the whole context
                samplers=[None if options.temp == 0 else options.sampler()],  # None: argmax
                logits_processors=[processors],
            )
        except ValueError as e:  # mlx-lm checks a sequence before it touches its state
            self._fail(job, e)  # the job is in neither the queue nor the batch: tell it here
            return
        except Exception as e:
            self._fail(job, e)
            raise  # the generator's state is unknown: the loop fails the batch, starts afresh
        if seq is None:
            seq = Sequence(job, _for_mlx_lm(self.tokenizer).detokenizer, self._eos, reused)
        self._running[uid] = seq

    def _step(self, gen: Any) -> None:
        _, responses = gen.next()
        if responses:
            self.stats.batch_steps += 1
            self.stats.peak_batch = max(self.stats.peak_batch, len(responses))
        ended = []
        for r in responses:
            seq = self._running.get(r.uid)
            if seq is None:
                continue
            self.stats.generated_tokens += 1
            ends = seq.push(r.token, r.logprobs)  # EOS, max_tokens or a stop string
            if r.finish_reason is not None:  # mlx-lm ended it (EOS, max_tokens): its cache
                if not ends:
                    seq.job.sink(seq.finished(r.finish_reason))
                self.stats.completed += 1
                self._leave(r.uid, r.prompt_cache, r.all_tokens)
            elif ends:
                self.stats.completed += 1
                ended.append(r.uid)
        self._remove(gen, ended)

    def _drop_cancelled(self, gen: Any) -> None:
        gone = [uid for uid, seq in self._running.items() if seq.job.cancelled.is_set()]
        self.stats.cancelled += len(gone)
        self._remove(gen, gone)

    def _remove(self, gen: Any, uids: list[int]) -> None:
        """Take ``uids`` out of the batch, keeping their caches for later prompts."""
        if not uids:
            return
        caches = gen.remove(uids, return_prompt_caches=True)
        for uid in uids:
            cache, tokens = caches.get(uid, (None, None))
            self._leave(uid, cache, tokens)

    def _leave(self, uid: int, cache: Any, tokens: Any) -> None:
        seq = self._running.pop(uid)
        if cache is not None and tokens is not None:
            self.prefix_cache.put(cache, tokens)
        self._done(seq.job)

    def _fail(self, job: Job, e: Exception) -> None:
        if not isinstance(e, OpenELMError):  # a bug, not a bad request: keep the traceback
            log.error("generation failed", exc_info=e)
        self.stats.failed += 1
        job.sink(Failed(e))
        self._done(job)

    def _fail_batch(self, e: Exception) -> None:
        self.prefix_cache.clear()
        for seq in self._running.values():
            self._fail(seq.job, e)
        self._running.clear()

    # --- Alone ------------------------------------------------------------------------------

    def _run_alone(self, job: Job, gen: Any = None) -> None:
        """Decode ``job`` by itself through ``stream_generate`` (prompt lookup included). With
        ``gen`` (a lookup job that found the engine idle), hand it to that batch when another
        job arrives, one that need not run alone."""
        options = self._checked(job)
        if options is None:
            return
        self._solo = job
        self.stats.solo += 1
        self.stats.lookup += uses_lookup(job)
        cache, reused = self.prefix_cache.take(job.ids)
        seq = Sequence(job, _for_mlx_lm(self.tokenizer).detokenizer, self._eos, reused)
        tokens, handoff, counts = list(job.ids), False, LookupStats()
        # No stop strings here: the Sequence matches them, as it does in the batch.
        responses = stream_generate(
            self.model, self.tokenizer, job.ids[reused:], options=options.replace(stop=()),
            prompt_cache=cache, context=job.ids[:reused], lookup_stats=counts,
        )  # fmt: skip
        try:
            for r in responses:
                tokens.append(r.token)
                self.stats.generated_tokens += 1
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                    break
                if seq.push(r.token, r.logprobs):
                    self.stats.completed += 1
                    break
                if gen is not None and self._waiting and not runs_alone(self._waiting[0]):
                    handoff = True  # someone else wants the model: go on together
                    break
        except Exception as e:
            self.prefix_cache.clear()
            self._fail(job, e)
            return
        finally:
            responses.close()  # lookup trims the cache to the tokens yielded (or all but last)
            self._solo = None
            self.stats.lookup_proposed += counts.proposed
            self.stats.lookup_accepted += counts.accepted
        if not handoff:
            self.prefix_cache.put(cache, tokens)
            self._done(job)
            return
        self.stats.handed_off += 1
        if cache[0].offset == len(tokens):  # the batch feeds the last token itself
            for c in cache:
                c.trim(1)
        held = (cache, len(tokens) - 1) if cache[0].offset == len(tokens) - 1 else None
        self._insert(gen, job, (seq, tokens, held))
