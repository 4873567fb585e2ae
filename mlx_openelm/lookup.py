"""Prompt-lookup decoding: draft tokens copied from the context, verified in one forward pass.

Apple's OpenELM model card suggests ``prompt_lookup_num_tokens=10``: when the text being written
repeats text already in the context (quoting a passage, code, a name, a list), the tokens that
followed the last occurrence of the current n-gram are a free guess at what comes next. mlx-lm
has no such path, so this module owns it:

- :class:`NGramIndex` proposes candidates as Hugging Face's ``PromptLookupCandidateGenerator``
  does, the longest suffix n-gram first (``max_ngram``: 4 by default, Hugging Face's is 2;
  down to ``min_ngram``), up to N tokens of what followed it, with two changes measured on the
  trained checkpoint and the 270M shape (RESULTS.md, *Decoding*): the **latest** earlier
  occurrence, not the earliest (recent text predicts better), and a continuation that reaches
  the present **repeats** as an LZ77 copy does (a loop of period 1-2 then yields N candidates,
  not 1-2). A dictionary of latest occurrences makes each proposal O(max_ngram), not a scan of
  the context.
- :func:`lookup_generate_step` feeds ``[last token] + candidates`` through the model once, keeps
  the accepted prefix and the model's own next token, and trims the KV cache past the rejected
  ones. Greedy acceptance (candidate == argmax) gives exactly plain greedy decoding's tokens;
  with sampling, the speculative-sampling rule for a point-mass draft (accept candidate ``c``
  with probability ``p(c)``, else draw from ``p`` without ``c``) keeps the output distribution
  exactly that of plain sampling.
- The number of candidates adapts within ``[1, N]`` (Hugging Face's schedule for draft models:
  two more after a full acceptance, one fewer otherwise).
- When lookup keeps missing (no match, or a verification that accepted nothing) it falls back
  to plain decoding, pipelined like mlx-lm's ``generate_step`` (the next step is queued before
  the current token is read), for a back-off that doubles while misses continue.

The sampling distribution is built from mlx-lm's own filters (``apply_top_p``, ``apply_min_p``,
``apply_top_k``, in ``make_sampler``'s order, then the temperature), so plain and lookup steps
draw from the same distribution as mlx-lm's sampler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

__all__ = ["LookupStats", "NGramIndex", "Sampling", "lookup_generate_step"]

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

# Back-off after a miss: plain tokens before lookup is tried again (doubling to the cap).
_BACKOFF_START, _BACKOFF_CAP = 4, 64


class NGramIndex:
    """The latest start of every n-gram (``n <= max_ngram``) of a growing token list, and for
    the current suffix n-grams, their latest start before the suffix itself. Proposals come
    from matches of ``min_ngram`` to ``max_ngram`` tokens."""

    def __init__(self, tokens: Sequence[int] = (), max_ngram: int = 4, min_ngram: int = 1) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}
        self._before: list[int | None] = [None] * (max_ngram + 1)  # by n, for the suffix
        self.extend(tokens)

    def append(self, token: int) -> None:
        toks = self.tokens
        toks.append(token)
        end = len(toks)
        for n in range(1, min(self.max_ngram, end) + 1):
            key = tuple(toks[end - n :])
            self._before[n] = self._last.get(key)
            self._last[key] = end - n

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.append(t)

    def propose(self, num_tokens: int) -> list[int]:
        """Up to ``num_tokens`` tokens that followed the latest earlier occurrence of the longest
        matching suffix n-gram, copied as LZ77 copies: a continuation that runs into the present
        repeats itself (a match ``d`` tokens back predicts period ``d``)."""
        toks, end = self.tokens, len(self.tokens)
        if num_tokens < 1:
            return []
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            start = self._before[n]
            if start is not None:
                src = start + n  # < end: the occurrence ends before the suffix does
                period = end - src
                return [toks[src + i % period] for i in range(num_tokens)]
        return []


@dataclass
class LookupStats:
    """Counts for one generation: candidate tokens ``proposed``, ``accepted`` of them, and the
    verification passes (``verify_steps``) that checked them."""

    proposed: int = 0
    accepted: int = 0
    verify_steps: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass(frozen=True)
class Sampling:
    """The sampler's settings (``temp == 0``: greedy), as in mlx-lm's ``make_sampler``."""

    temp: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0

    def log_distribution(self, logprobs: mx.array) -> mx.array:
        """Rows of normalized log-probabilities the sampler draws from: mlx-lm's filters in
        ``make_sampler``'s order, then the temperature."""
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        scaled = logprobs * (1.0 / self.temp)
        return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)

    def sample(self, logprobs: mx.array) -> mx.array:
        """One token per row (lazy)."""
        if self.temp == 0:
            return mx.argmax(logprobs, axis=-1)
        return mx.random.categorical(self.log_distribution(logprobs))


def accept_greedy(scores: mx.array, candidates: list[int]) -> list[int]:
    """Tokens to emit after verifying ``candidates`` against ``k + 1`` rows of scores (logits
    or logprobs: the same argmax): the candidates that equal the argmax, then the argmax where
    they stop (or after the last)."""
    best = mx.argmax(scores, axis=-1).tolist()
    n = 0
    while n < len(candidates) and candidates[n] == best[n]:
        n += 1
    return candidates[:n] + [best[n]]


def accept_sampled(logprobs: mx.array, candidates: list[int], sampling: Sampling) -> list[int]:
    """The speculative-sampling rule for a draft that is certain of each candidate.

    Candidate ``c`` at row ``i`` is accepted with probability ``p_i(c)`` (``min(1, p/q)`` with
    ``q(c) = 1``); at the first rejection the token is drawn from ``p_i`` with ``c`` removed
    (the normalized ``max(0, p - q)``), and after ``k`` acceptances from ``p_k``. Each emitted
    token is then distributed exactly as plain sampling's.
    """
    k = len(candidates)
    dist = sampling.log_distribution(logprobs)  # (k + 1, V)
    cand = mx.array(candidates, dtype=mx.uint32)
    p_cand = mx.exp(mx.take_along_axis(dist[:k], cand[:, None], axis=-1)).squeeze(-1)
    accept = mx.random.uniform(shape=(k,)) < p_cand
    residual = mx.put_along_axis(dist[:k], cand[:, None], mx.array(-mx.inf, dist.dtype), axis=-1)
    draws = mx.random.categorical(mx.concatenate([residual, dist[k:]], axis=0))
    accepted, drawn = accept.tolist(), draws.tolist()
    n = 0
    while n < k and accepted[n]:
        n += 1
    return candidates[:n] + [drawn[n]]


def lookup_generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    cache: list[Any],
    context: Sequence[int] = (),
    num_tokens: int = 10,
    max_ngram: int = 4,
    min_ngram: int = 1,
    max_tokens: int = 256,
    sampling: Sampling = Sampling(),
    logits_processors: Sequence[LogitsProcessor] = (),
    stats: LookupStats | None = None,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """Generate with prompt lookup; yields ``(token, logprobs, from_lookup)`` like mlx-lm's steps.

    Args:
        prompt: the token ids to run (``cache`` already holds ``context`` before them).
        cache: a trimmable KV cache, extended in place. When the generator ends or is closed,
            it holds ``context``, the prompt and the yielded tokens (all, or all but the last).
        context: ids already in ``cache``; lookup matches and the logits processors see them.
        num_tokens, max_ngram: at most N candidates, from suffix n-grams of at most this size.
        min_ngram: a shorter match proposes nothing (vLLM's ``prompt_lookup_min``).
        sampling: the sampler; ``logits_processors`` see the whole history (context included).
        stats: counts proposed and accepted candidates, when given.

    Raises:
        ValueError: the cache cannot be trimmed (a rotating cache).
    """
    from mlx_lm.generate import generation_stream
    from mlx_lm.models.cache import can_trim_prompt_cache

    if not can_trim_prompt_cache(cache):
        raise ValueError("prompt lookup needs a trimmable KV cache (not a rotating one)")
    step = _Decoder(model, cache, sampling, list(logits_processors), stats or LookupStats())
    ids = prompt.tolist()
    with mx.stream(generation_stream):
        step.prefill(prompt, prefill_step_size, prompt_progress_callback)
        step.index = NGramIndex([*context, *ids], max_ngram, min_ngram)
        yield from step.run(num_tokens, max_tokens)


class _Decoder:
    """The state of one lookup generation: the cache holds every token of ``index.tokens`` but
    the last, which the next forward pass feeds."""

    def __init__(
        self,
        model: nn.Module,
        cache: list[Any],
        sampling: Sampling,
        processors: list[LogitsProcessor],
        stats: LookupStats,
    ) -> None:
        self.model, self.cache, self.sampling = model, cache, sampling
        self.processors, self.stats = processors, stats
        self.index = NGramIndex()
        self.emitted = 0
        self.backoff = 0  # plain tokens to generate before lookup is tried again
        self.next_backoff = _BACKOFF_START
        self.width = 0  # candidates to propose next (set to N by run)

    def prefill(
        self, prompt: mx.array, step: int, progress: Callable[[int, int], None] | None
    ) -> None:
        """Run all prompt tokens but the last through the model (in chunks, like mlx-lm)."""
        total, done = prompt.size, 0
        progress = progress or (lambda *_: None)
        progress(0, total)
        while total - done > 1:
            n = min(step, total - done - 1)
            self.model(prompt[done : done + n][None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            done += n
            progress(done, total)
            mx.clear_cache()
        self._progress = lambda: progress(total, total)

    def run(self, num_tokens: int, max_tokens: int) -> Iterator[tuple[int, mx.array, bool]]:
        first, self.width, self.max_width = True, num_tokens, num_tokens
        self.start = len(self.index.tokens)  # context + prompt
        try:
            while self.emitted < max_tokens:
                left = max_tokens - self.emitted
                cands = self.index.propose(min(self.width, left - 1)) if not self.backoff else []
                if cands:
                    tokens = self._verify(cands)
                else:
                    tokens = self._plain(left)
                for token, logprobs, drafted in tokens:
                    if first:
                        self._progress()
                        first = False
                    self.emitted += 1
                    yield token, logprobs, drafted
        finally:  # drop verified candidates never yielded (EOS or the caller stopped first)
            self._trim_to(self.start + self.emitted)

    def _trim_to(self, length: int) -> None:
        """Drop cached tokens past ``length`` (candidates verified but never yielded)."""
        for c in self.cache:
            if c.offset > length:
                c.trim(c.offset - length)

    def _scores(self, logits: mx.array, history: mx.array | None) -> mx.array:
        for processor in self.processors:
            logits = processor(history, logits)
        return logits

    def _logprobs(self, logits: mx.array, history: mx.array | None) -> mx.array:
        scores = self._scores(logits, history)
        return scores - mx.logsumexp(scores, axis=-1, keepdims=True)

    def _verify(self, cands: list[int]) -> list[tuple[int, mx.array, bool]]:
        """One forward pass over ``[last] + cands``; the accepted prefix and the next token."""
        inputs = [self.index.tokens[-1], *cands]
        logits = self.model(mx.array(inputs, dtype=mx.uint32)[None], cache=self.cache)[0]
        if self.processors:  # each row sees the history up to its own position
            history = mx.array([*self.index.tokens, *cands], dtype=mx.uint32)
            base = len(self.index.tokens)
            rows = [
                self._scores(logits[i : i + 1], history[: base + i]) for i in range(len(inputs))
            ]
            scores = mx.concatenate(rows, axis=0)
        else:
            scores = logits
        logprobs = scores - mx.logsumexp(scores, axis=-1, keepdims=True)  # lazy when greedy
        if self.sampling.temp == 0:
            out = accept_greedy(scores, cands)
        else:
            out = accept_sampled(logprobs, cands, self.sampling)
        accepted = len(out) - 1
        self._trim_to(len(self.index.tokens) + accepted)  # the cache now ends at the last accepted
        self._count(accepted, len(cands))
        self.index.extend(out)
        return [(t, logprobs[i], i < accepted) for i, t in enumerate(out)]

    def _count(self, accepted: int, proposed: int) -> None:
        """Record a verification and adapt: Hugging Face's schedule for assistant models (2 more
        candidates after a full acceptance, 1 fewer otherwise) keeps a verification about as
        long as what tends to be accepted; a miss sends decoding plain for a while, longer each
        time misses continue."""
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        self.stats.verify_steps += 1
        full = accepted == proposed
        self.width = min(self.width + 2, self.max_width) if full else max(self.width - 1, 1)
        if accepted:
            self.next_backoff = _BACKOFF_START
        else:
            self.backoff = self.next_backoff
            self.next_backoff = min(2 * self.next_backoff, _BACKOFF_CAP)

    def _plain_step(self, token: mx.array, history: mx.array | None) -> tuple[mx.array, mx.array]:
        logits = self.model(token.reshape(1, 1), cache=self.cache)[:, -1, :]
        logprobs = self._logprobs(logits, history)
        return self.sampling.sample(logprobs), logprobs.squeeze(0)

    def _plain(self, left: int) -> Iterator[tuple[int, mx.array, bool]]:
        """Plain decoding, pipelined like mlx-lm's: the next step is queued before the current
        token is read. Ends (the cache lacking the last token) once the back-off has run out
        and the context has a match for the newest token, or at ``left`` tokens."""
        history = mx.array(self.index.tokens, dtype=mx.uint32) if self.processors else None
        cur = self._plain_step(mx.array(self.index.tokens[-1:], dtype=mx.uint32), history)
        mx.async_eval(cur)
        for n in range(left):
            self.backoff = max(self.backoff - 1, 0)
            leave = n + 1 == left or (not self.backoff and self.index.propose(1))
            if not leave:
                if history is not None:
                    history = mx.concatenate([history, cur[0].reshape(1).astype(mx.uint32)])
                nxt = self._plain_step(cur[0], history)
                mx.async_eval(nxt)
            token = cur[0].item()
            self.index.append(token)
            yield token, cur[1], False
            if leave:
                return
            cur = nxt
            if n % 256 == 255:
                mx.clear_cache()


def stream_responses(
    tokens: Iterator[tuple[int, mx.array, bool]],
    tokenizer: Any,
    prompt_size: int,
    max_tokens: int,
) -> Iterator[Any]:
    """``GenerationResponse`` per token from a ``(token, logprobs, from_draft)`` iterator, with
    mlx-lm's ``stream_generate`` semantics (EOS ends it and is not decoded; timing; peak memory),
    which cannot be handed a token iterator of its own.

    Args:
        tokenizer: an mlx-lm ``TokenizerWrapper`` (its detokenizer and EOS ids are used).
    """
    from mlx_lm.generate import GenerationResponse

    detokenizer = tokenizer.detokenizer
    tic = time.perf_counter()
    prompt_tps, n, item = 0.0, 0, (0, None, False)

    def response(finish_reason: str | None) -> GenerationResponse:
        token, logprobs, drafted = item
        return GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=drafted,
            prompt_tokens=prompt_size,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / (time.perf_counter() - tic),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
        )

    eos = tokenizer.eos_token_ids
    try:
        for n, item in enumerate(tokens):
            if n == 0:
                prompt_tps = prompt_size / (time.perf_counter() - tic)
                tic = time.perf_counter()
            if item[0] in eos:
                break
            detokenizer.add_token(item[0])
            if n + 1 == max_tokens:
                break
            yield response(None)
        detokenizer.finalize()
        yield response("stop" if item[0] in eos else "length")
    finally:
        tokens.close()
