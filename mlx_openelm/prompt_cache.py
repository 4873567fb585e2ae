"""Reusing the KV cache across requests that share a prompt prefix.

Chat clients resend the whole conversation every turn, so turn N+1's prompt starts with turn
N's prompt and (up to how the reply is re-tokenized) turn N's reply. :class:`PrefixCache` keeps
the KV cache of the last generation together with the exact tokens it holds; the next request
gets that cache trimmed back to the longest common prefix and only its new tokens are run
through the model.

    cache, reused = prefix.take(ids)           # cache already holds ids[:reused]
    ... stream_generate(model, tok, ids[reused:], prompt_cache=cache) ...
    prefix.put(cache, ids + generated_tokens)  # keep it for the next request
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from .generate import make_cache
from .tokenizer import common_prefix_length

__all__ = ["CacheStats", "PrefixCache", "common_prefix_length", "reuse_prefix"]


def reuse_prefix(cache: list[Any] | None, held: Sequence[int], ids: Sequence[int]) -> int:
    """Trim ``cache`` (which holds ``held``) in place to its longest common prefix with the
    prompt ``ids``; how many of ``ids`` it now holds, 0 when it cannot be reused.

    At least the last prompt token is always left to run, since generation starts from its
    logits. A cache that needs trimming but cannot be trimmed (a rotating cache that has wrapped
    around) is not reusable; one that needs no trimming always is.
    """
    reuse = min(common_prefix_length(held, ids), len(ids) - 1)
    if cache is None or reuse <= 0:
        return 0
    if reuse < len(held):
        if not can_trim_prompt_cache(cache):
            return 0
        trim_prompt_cache(cache, len(held) - reuse)
    return reuse


@dataclass
class CacheStats:
    """Counts since start: ``hits`` reused at least one token, ``reused_tokens`` in total."""

    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class PrefixCache:
    """One KV cache kept between requests (one model, one generation at a time).

    Not thread-safe: the server's generation thread is its only user.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stats = CacheStats()
        self._cache: list[Any] | None = None
        self._tokens: list[int] = []

    @property
    def tokens(self) -> list[int]:
        """The tokens the kept cache holds (empty when none is kept)."""
        return list(self._tokens)

    def take(self, ids: Sequence[int]) -> tuple[list[Any], int]:
        """A cache for a prompt of ``ids`` and how many of them it already holds.

        The kept cache is handed over (trimmed in place, see :func:`reuse_prefix`); give it back
        with :meth:`put`.
        """
        cache, held = self._cache, self._tokens
        self.clear()
        reuse = reuse_prefix(cache, held, ids)
        if reuse == 0:
            self.stats.misses += 1
            return make_cache(self.model), 0
        self.stats.hits += 1
        self.stats.reused_tokens += reuse
        return cache, reuse

    def put(self, cache: list[Any], tokens: Sequence[int]) -> None:
        """Keep ``cache`` for the next request; it holds ``tokens``, or (prompt lookup and
        speculative decoding never feed the last token) all of them but the last.

        A cache whose length fits neither is dropped rather than trusted.
        """
        offset = getattr(cache[0], "offset", None) if cache else None
        if offset is not None and len(tokens) - 1 <= offset <= len(tokens):
            self._cache, self._tokens = cache, list(tokens[:offset])
        else:
            self.clear()

    def clear(self) -> None:
        self._cache, self._tokens = None, []
