"""Multi-turn chat that keeps the KV cache across turns.

``ChatSession`` holds the conversation and a prompt cache. Each turn it renders the whole
conversation with the chat template, keeps the longest token prefix the cache already holds and
prefills only the rest, so a turn costs its new tokens (the user message and the template's glue)
rather than the whole history.

The tokens are *token-faithful*: the model's reply stays in the cache as the ids it generated,
not as a re-encoding of its text (SentencePiece may split the text differently, and the template
puts ``<|assistant|>\\n`` and the reply in one stretch). So the next turn's ids are the cached ids
plus the encoding of the rendered text that follows them, which for the Zephyr template starts
after the reply's ``</s>``, where a fresh encoding starts anyway. When the rendered text does not
extend the cached text (a new system prompt, ``/load``, a stop string cut the reply, turns
dropped for context) the conversation is encoded afresh and the cache is trimmed to the common
prefix.

``run_repl``, the read-eval-print loop behind ``mlx-openelm chat``, lives in
:mod:`mlx_openelm.chat_repl`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

from .errors import DataError, GenerationError, short
from .folder import atomic_write_text
from .generate import GenerationOptions, check_draft_model, make_cache, stream_generate
from .jsonio import read_jsonl
from .lookup import LookupStats
from .prompt_cache import reuse_prefix

if TYPE_CHECKING:
    from mlx_lm.generate import GenerationResponse

ROLES = ("system", "user", "assistant")


@dataclass(kw_only=True)
class TurnStats:
    """What one turn cost. ``prefilled_tokens`` of ``prompt_tokens`` ran through the model; the
    rest came from the cache."""

    prompt_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str  # "stop", "length" or "interrupted"
    dropped_turns: int = 0
    draft_tokens: int = 0  # accepted from the draft model or, with prompt lookup, the context
    lookup_proposed: int = 0  # prompt-lookup candidates checked


@dataclass(kw_only=True)
class Turn:
    """A planned reply: the conversation fits the context and the cache is ready.

    Iterate it (once) to generate; the session records the reply when iteration ends.
    """

    session: ChatSession
    history: list[dict[str, str]]  # the conversation including the new user message
    text: str  # the rendered prompt
    tokens: list[int]  # its ids
    reused: int  # leading ids already in the cache
    max_tokens: int
    dropped_turns: int

    @property
    def prefilled_tokens(self) -> int:
        return len(self.tokens) - self.reused

    def __iter__(self) -> Iterator[GenerationResponse]:
        return self.session._generate(self)


class ChatSession:
    """A conversation with an instruct model whose KV cache lives across turns.

    Args:
        model, tokenizer: from ``mlx_openelm.load``; the tokenizer needs a chat template.
        system: an optional system prompt.
        options: how to generate each reply (:class:`GenerationOptions`; ``max_tokens`` is the
            most tokens per reply; ``seed`` seeds the session once).
        context_length: tokens the model attends to (default: the model's
            ``max_context_length``, 2048 for OpenELM); older turns are dropped to stay inside.
        draft_model: a smaller model for speculative decoding.
        **option_keywords: :class:`GenerationOptions` fields applied over ``options``.

    Raises:
        GenerationError: no chat template, or an option out of range.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        system: str | None = None,
        options: GenerationOptions | None = None,
        context_length: int | None = None,
        draft_model: nn.Module | None = None,
        **option_keywords: Any,
    ) -> None:
        if tokenizer.chat_template is None:
            raise GenerationError(
                "chat needs an instruct model with a chat template, and this tokenizer has "
                "none; use an -Instruct model, or `mlx-openelm generate` for base models"
            )
        options = GenerationOptions.of(options, **option_keywords).validate()
        if draft_model is not None:
            check_draft_model(model, draft_model, options)
        if options.seed is not None:
            mx.random.seed(options.seed)  # once per session, so turns do not repeat the same draws
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.system = system or None
        self.options = options.replace(seed=None)
        self.context_length = context_length or model.args.max_context_length
        self.history: list[dict[str, str]] = []
        self.turns: list[TurnStats] = []
        self._cache: list[Any] | None = None  # None: build a fresh one next turn
        self._ids: list[int] = []  # the conversation's ids so far, as the model saw them
        self._text: str | None = None  # the text they render, when known exactly
        self._in_cache = 0  # leading ids of self._ids the cache holds

    # -- conversation ---------------------------------------------------------------------

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat-template messages, system prompt first."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(m) for m in self.history]

    @property
    def cached_tokens(self) -> int:
        """How many conversation tokens the KV cache holds now."""
        return self._in_cache if self._cache is not None else 0

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays and its cached prefix is reused."""
        self.history = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def send(self, text: str) -> Turn:
        """Plan a reply to ``text``: fit the context, reuse the cache. Iterate the result.

        Raises:
            GenerationError: the message alone does not fit the context.
        """
        history = [*self.history, {"role": "user", "content": text}]
        tokens, rendered = self._tokens_for(history)
        dropped = 0
        while (
            len(tokens) + self.options.max_tokens > self.context_length and _num_turns(history) > 1
        ):
            history = _drop_oldest_turn(history)
            dropped += 1
            tokens, rendered = self._tokens_for(history)
        if len(tokens) >= self.context_length:
            raise GenerationError(
                f"this message makes a {len(tokens)}-token prompt, which does not fit the "
                f"{self.context_length}-token context; send a shorter message"
            )
        max_tokens = min(self.options.max_tokens, self.context_length - len(tokens))
        reused = self._reuse_cache(tokens)
        return Turn(
            session=self,
            history=history,
            text=rendered,
            tokens=tokens,
            reused=reused,
            max_tokens=max_tokens,
            dropped_turns=dropped,
        )

    # -- transcripts ------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the conversation as JSONL (one ``{"role", "content"}`` per line)."""
        lines = [json.dumps(m, ensure_ascii=False) + "\n" for m in self.messages]
        try:
            atomic_write_text(path, "".join(lines))
        except OSError as e:
            raise DataError(f"cannot write transcript {path}: {e.strerror or e}") from e

    def load(self, path: str | Path) -> None:
        """Replace the conversation (and system prompt) with a JSONL transcript.

        Raises:
            DataError: the file is missing, unreadable or not a transcript (with the line).
        """
        messages = read_transcript(path)
        has_system = bool(messages) and messages[0]["role"] == "system"
        self.system = messages[0]["content"] if has_system else None
        self.history = messages[1:] if has_system else messages

    # -- internals ----------------------------------------------------------------------------

    def _tokens_for(self, history: list[dict[str, str]]) -> tuple[list[int], str]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        text = self.tokenizer.apply_chat_template(system + history, add_generation_prompt=True)
        if self._text is not None and text.startswith(self._text):
            rest = self.tokenizer.encode(text[len(self._text) :], add_special_tokens=False)
            return self._ids + rest, text
        return self.tokenizer.encode(text, add_special_tokens=True), text

    def _reuse_cache(self, tokens: list[int]) -> int:
        """Trim the cache to its longest prefix of ``tokens`` (leaving one to run); its length."""
        if self._cache is None:
            self._forget_cache()
        n = reuse_prefix(self._cache, self._ids[: self._in_cache], tokens)
        if n == 0 and self._in_cache > 0:  # nothing in common, or it cannot be trimmed
            self._cache = self._new_cache()
        self._in_cache = n
        return n

    def _new_cache(self) -> list[Any]:
        o = self.options
        return make_cache(self.model, self.draft_model, o.max_kv_size, o.kv_bits, o.kv_group_size)

    def _forget_cache(self) -> None:
        self._cache = self._new_cache()
        self._ids, self._text, self._in_cache = [], None, 0

    def _generate(self, turn: Turn) -> Iterator[GenerationResponse]:
        pieces: list[str] = []
        generated: list[int] = []
        last: GenerationResponse | None = None
        drafted, lookup = 0, LookupStats()
        try:
            for last in stream_generate(
                self.model,
                self.tokenizer,
                turn.tokens[turn.reused :],
                turn.max_tokens,
                options=self.options,
                prompt_cache=self._cache,
                draft_model=self.draft_model,
                context=turn.tokens[: turn.reused],
                lookup_stats=lookup,
            ):
                pieces.append(last.text)
                generated.append(last.token)
                drafted += last.from_draft
                yield last
        finally:
            # No finish reason: interrupted inside mlx-lm's loop, the cache may be half-updated.
            finished = last is not None and last.finish_reason is not None
            if finished:
                self._sync_cache(turn, generated)
            else:
                self._cache = None
            reply = "".join(pieces)
            keep = turn.history if reply else turn.history[:-1]  # nothing came: drop the question
            self.history = keep + ([{"role": "assistant", "content": reply}] if reply else [])
            self.turns.append(
                TurnStats(
                    prompt_tokens=len(turn.tokens),
                    prefilled_tokens=turn.prefilled_tokens,
                    generated_tokens=len(generated),
                    prompt_tps=last.prompt_tps if last else 0.0,
                    generation_tps=last.generation_tps if last else 0.0,
                    peak_memory=last.peak_memory if last else 0.0,
                    finish_reason=last.finish_reason if finished else "interrupted",
                    dropped_turns=turn.dropped_turns,
                    draft_tokens=drafted,
                    lookup_proposed=lookup.proposed,
                )
            )

    def _sync_cache(self, turn: Turn, generated: list[int]) -> None:
        """The conversation's ids are now the prompt and every generated id, EOS included; the
        cache holds all or (speculative decoding leaves the last one out) all but the last."""
        assert self._cache is not None
        self._ids = turn.tokens + generated
        self._text = turn.text + self.tokenizer.decode(generated, skip_special_tokens=False)
        n = min([len(self._ids), *(c.offset for c in self._cache)])
        for c in self._cache:  # every layer, the draft model's too, must hold the same ids
            if c.offset > n and not c.is_trimmable():
                self._cache = None
                return
            c.trim(c.offset - n)
        self._in_cache = n


def _num_turns(history: list[dict[str, str]]) -> int:
    return sum(m["role"] == "user" for m in history)


def _drop_oldest_turn(history: list[dict[str, str]]) -> list[dict[str, str]]:
    """Drop messages up to (not including) the second user message."""
    users = [i for i, m in enumerate(history) if m["role"] == "user"]
    return history[users[1] :]


def read_transcript(path: str | Path) -> list[dict[str, str]]:
    """Messages of a JSONL transcript written by ``/save``.

    Raises:
        DataError: missing or unreadable file, bad JSON, unknown role, or a misplaced system line.
    """
    path = Path(path)
    how = "give a JSONL file written by /save (one object per line)"
    messages: list[dict[str, str]] = []
    for number, item in read_jsonl(path, DataError, how):
        where = f"{path}:{number}"
        if item.get("role") not in ROLES or not isinstance(item.get("content"), str):
            raise DataError(
                f'{where}: expected {{"role": "system"|"user"|"assistant", "content": "..."}}, '
                f"got {short(item, 60)}"
            )
        if item["role"] == "system" and messages:
            raise DataError(f"{where}: a system message may only be the first line")
        messages.append({"role": item["role"], "content": item["content"]})
    return messages
