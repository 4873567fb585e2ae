"""Reusing the KV cache across requests that share a prompt prefix.

Chat clients resend the whole conversation every turn, so turn N+1's prompt starts with turn
N's prompt and (up to how the reply is re-tokenized) turn N's reply. :class:`PrefixCache` keeps
the KV caches of several finished generations, each with the exact tokens it holds, and evicts
the least recently used once their arrays take more than ``max_bytes``. A new request gets a
copy of the entry sharing its longest prefix, cut back to that prefix, and only its new tokens
are run through the model. Entries are never handed out themselves, so two requests with the
same system prompt can both start from it.

    cache, reused = prefix.take(ids)           # cache already holds ids[:reused]
    ... generate from ids[reused:] with prompt_cache=cache ...
    prefix.put(cache, ids + generated_tokens)  # keep it for the next request

:func:`load_prefix` and :func:`save_prefix` keep one prefix (a long system prompt) on disk in
mlx-lm's ``save_prompt_cache`` format, its tokens in the file's metadata.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, trim_prompt_cache

from .errors import ServeError
from .generate import make_cache
from .jsonio import parse_json
from .serve.schema import DEFAULT_CACHE_BYTES  # the server's default, kept with its others
from .tokenizer import common_prefix_length

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "CacheStats",
    "PrefixCache",
    "cache_nbytes",
    "common_prefix_length",
    "load_or_build_prefix",
    "load_prefix",
    "prefill",
    "reuse_prefix",
    "save_prefix",
    "system_prefix",
]


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


def cache_nbytes(cache: Sequence[Any]) -> int:
    """Bytes of a cache's key and value arrays (their whole buffers, room to grow included)."""
    return sum(int(c.nbytes) for c in cache)


@dataclass
class CacheStats:
    """Counts since start: ``hits`` reused at least one token, ``reused_tokens`` in total;
    ``evicted`` entries dropped for room; ``entries`` and ``bytes`` held now."""

    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    evicted: int = 0
    entries: int = 0
    bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Entry:
    tokens: list[int]
    cache: list[KVCache]
    nbytes: int
    pinned: bool = False  # the --prompt-cache-file prefix: never evicted


class PrefixCache:
    """KV caches of several prompt prefixes, least recently used evicted past ``max_bytes``.

    Only plain :class:`KVCache` lists are kept (a quantized or rotating cache is dropped).
    Not thread-safe: the server's generation thread is its only user.
    """

    def __init__(self, model: nn.Module, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.model, self.max_bytes = model, max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest use first
        self._next_key = 0

    @property
    def entries(self) -> list[list[int]]:
        """The tokens each kept cache holds, least recently used first."""
        return [list(e.tokens) for e in self._entries.values()]

    def take(self, ids: Sequence[int]) -> tuple[list[Any], int]:
        """A cache for a prompt of ``ids`` and how many of them it already holds: a copy of the
        entry sharing the longest prefix with ``ids`` cut back to it, or a fresh cache."""
        best, reuse = None, 0
        for key, entry in self._entries.items():
            n = min(common_prefix_length(entry.tokens, ids), len(ids) - 1)
            if n > reuse and (n == len(entry.tokens) or can_trim_prompt_cache(entry.cache)):
                best, reuse = key, n
        if best is None:
            self.stats.misses += 1
            return make_cache(self.model), 0
        self._entries.move_to_end(best)
        self.stats.hits += 1
        self.stats.reused_tokens += reuse
        return _prefix_copy(self._entries[best].cache, reuse), reuse

    def put(self, cache: list[Any], tokens: Sequence[int], *, pinned: bool = False) -> None:
        """Keep ``cache``; it holds ``tokens``, or (prompt lookup and speculative decoding never
        feed the last token) all of them but the last.

        A cache whose length fits neither, or that is not a list of plain KV caches, is
        dropped rather than trusted. Entries whose tokens are a prefix of ``tokens`` are
        dropped (the new one serves them too); then the least recently used go until the rest
        fit in ``max_bytes`` (a cache larger than that on its own is not kept).
        """
        offset = getattr(cache[0], "offset", None) if cache else None
        if not all(type(c) is KVCache for c in cache) or not isinstance(offset, int):
            return
        if not len(tokens) - 1 <= offset <= len(tokens) or offset == 0:
            return
        held = list(tokens[:offset])
        for key, entry in list(self._entries.items()):
            if not entry.pinned and held[: len(entry.tokens)] == entry.tokens:
                del self._entries[key]
        self._entries[self._next_key] = _Entry(held, cache, cache_nbytes(cache), pinned)
        self._next_key += 1
        self._evict()

    def clear(self) -> None:
        """Drop every entry but the pinned one."""
        for key in [k for k, e in self._entries.items() if not e.pinned]:
            del self._entries[key]
        self._count()

    def _evict(self) -> None:
        while self._bytes() > self.max_bytes:
            key = next((k for k, e in self._entries.items() if not e.pinned), None)
            if key is None:
                break
            del self._entries[key]
            self.stats.evicted += 1
        self._count()

    def _bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def _count(self) -> None:
        self.stats.entries, self.stats.bytes = len(self._entries), self._bytes()


def _prefix_copy(cache: list[KVCache], n: int) -> list[KVCache]:
    """New caches holding the first ``n`` positions of ``cache``; they share its arrays, which
    stay unchanged: a ``KVCache`` whose buffer is full concatenates into a new one."""
    out = []
    for c in cache:
        copy = KVCache()
        copy.keys, copy.values = c.keys[..., :n, :], c.values[..., :n, :]
        copy.offset = n
        out.append(copy)
    return out


def _layer_shapes(model: nn.Module) -> list[list[int]]:
    """(KV heads, head size) of every layer, as the file records them."""
    args = model.args
    return [[int(n), int(args.head_dim)] for n in args.num_kv_heads]


def save_prefix(
    path: str | Path, cache: list[Any], tokens: Sequence[int], model: nn.Module
) -> None:
    """Write ``cache`` (holding ``tokens``) with mlx-lm's ``save_prompt_cache``; the metadata
    records the tokens and the model's layer shapes, which :func:`load_prefix` checks."""
    from mlx_lm.models.cache import save_prompt_cache

    metadata = {"tokens": json.dumps(list(tokens)), "layers": json.dumps(_layer_shapes(model))}
    save_prompt_cache(str(path), cache, metadata)


def load_prefix(path: str | Path, model: nn.Module) -> tuple[list[KVCache], list[int]]:
    """The cache in ``path`` (written by :func:`save_prefix`) and the tokens it holds.

    Raises:
        ServeError: the file cannot be read, holds no token list (``mlx_lm.cache_prompt``
            writes none), or was made with a model of another shape.
    """
    from mlx_lm.models.cache import load_prompt_cache

    where = f"--prompt-cache-file {path}"
    try:
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    except Exception as e:  # mx.load's errors are RuntimeError/ValueError with a C++ message
        raise ServeError(f"{where} is not a prompt cache file ({e}); delete it to rebuild") from e
    if "tokens" not in metadata:
        raise ServeError(
            f"{where} does not list the tokens it holds (mlx_lm.cache_prompt does not record "
            "them); delete it and pass --cache-system-prompt TEXT to build one"
        )
    tokens = parse_json(metadata["tokens"], where, ServeError, "delete it to rebuild", list)
    if not all(type(t) is int for t in tokens):
        raise ServeError(f"{where}: its token list holds non-integers; delete it to rebuild")
    shapes = [[int(c.keys.shape[1]), int(c.keys.shape[3])] for c in cache if c.keys is not None]
    ours = _layer_shapes(model)
    if shapes != ours or not all(type(c) is KVCache for c in cache):
        raise ServeError(
            f"{where} was made with another model (its {len(shapes)} layers have "
            f"(KV heads, head size) {shapes[:3]}..., this model's {len(ours)} layers "
            f"{ours[:3]}...); delete it to rebuild it for this model"
        )
    if cache[0].offset != len(tokens):
        raise ServeError(f"{where} holds {cache[0].offset} positions for {len(tokens)} tokens")
    mx.eval([c.state for c in cache])
    return cache, tokens


def system_prefix(tokenizer: Any, text: str) -> list[int]:
    """The tokens every prompt with the system prompt ``text`` starts with: what two
    conversations that differ only after it share (the chat template's, for an Instruct model;
    else BOS + the text, as ``build_prompt`` writes it)."""
    if tokenizer.chat_template is not None:
        a, b = (
            tokenizer.encode_chat(
                [{"role": "system", "content": text}, {"role": "user", "content": u}]
            )
            for u in ("a", "b")
        )
    else:
        a, b = (tokenizer.encode(f"{text}\n\n{u}", add_special_tokens=True) for u in ("a", "b"))
    return a[: common_prefix_length(a, b)]


def prefill(model: nn.Module, tokens: Sequence[int], step: int = 512) -> list[Any]:
    """A fresh cache holding ``tokens`` (run through the model ``step`` at a time)."""
    cache = make_cache(model)
    for i in range(0, len(tokens), step):
        model(mx.array([list(tokens[i : i + step])]), cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def load_or_build_prefix(
    path: str | Path, model: nn.Module, tokenizer: Any, system_prompt: str | None
) -> tuple[list[KVCache], list[int]]:
    """``path``'s prefix (:func:`load_prefix`); when there is no such file, the prefix of
    ``system_prompt`` (:func:`system_prefix`) run through the model and saved there.

    Raises:
        ServeError: as :func:`load_prefix`; no file and no ``system_prompt``; the system prompt
            has no tokens; the file cannot be written.
    """
    path = Path(path)
    if path.exists():
        return load_prefix(path, model)
    if not system_prompt:
        raise ServeError(
            f"--prompt-cache-file {path} does not exist; pass --cache-system-prompt TEXT to "
            "build it (or give an existing file)"
        )
    tokens = system_prefix(tokenizer, system_prompt)
    if not tokens:
        raise ServeError("--cache-system-prompt gives no tokens that every prompt starts with")
    cache = prefill(model, tokens)
    try:
        save_prefix(path, cache, tokens, model)
    except (OSError, RuntimeError, ValueError) as e:
        raise ServeError(f"cannot write --prompt-cache-file {path}: {e}") from e
    return cache, tokens
