"""OpenAI's response shapes for the server: bodies, stream chunks, usage and logprobs."""

from __future__ import annotations

import itertools
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ChatFormat", "CompletionFormat", "TokenLogprob", "token_texts", "usage"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the ``top`` alternatives, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        # A token a grammar masked (structured output) has logprob -inf: it is no alternative,
        # and JSON has no -Infinity.
        top = tuple((t, lp) for t, lp in self.top if math.isfinite(lp))
        object.__setattr__(self, "top", top)


def token_texts(vocab: Mapping[str, int]) -> list[tuple[str, list[int]]]:
    """Per token id: its text and UTF-8 bytes for logprobs (``▁`` → space, ``<0x0A>`` → byte)."""
    texts: list[tuple[str, list[int]]] = [("", [])] * (max(vocab.values(), default=-1) + 1)
    for piece, i in vocab.items():
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            raw = bytes([int(byte.group(1), 16)])
            texts[i] = (raw.decode("utf-8", errors="replace"), list(raw))
        else:
            text = piece.replace("\u2581", " ")
            texts[i] = (text, list(text.encode("utf-8")))
    return texts


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


Logprobs = Sequence[TokenLogprob] | None


class _Format:
    """Response bodies and stream chunks of one request (one id and timestamp for all)."""

    prefix = obj = chunk_obj = ""

    def __init__(self, model: str, texts: Sequence[tuple[str, list[int]]]) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self._texts = texts

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return {**head, "choices": choices}

    def usage_chunk(self, counts: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope(self.chunk_obj, []), "usage": counts}

    def _text(self, token: int) -> tuple[str, list[int]]:
        return self._texts[token] if 0 <= token < len(self._texts) else ("", [])


class ChatFormat(_Format):
    """``chat.completion`` bodies and ``chat.completion.chunk`` stream chunks."""

    prefix, obj, chunk_obj = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def first_chunk(self) -> dict[str, Any] | None:
        return self._chunk({"role": "assistant", "content": ""}, None, None)

    def piece_chunk(self, text: str, logprobs: Logprobs) -> dict[str, Any]:
        return self._chunk({"content": text}, None, logprobs)

    def final_chunk(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({}, finish_reason, None)

    def body(
        self, text: str, finish_reason: str, counts: dict[str, Any], logprobs: Logprobs
    ) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": self.logprobs(logprobs)}
        choices = [{**choice, "finish_reason": finish_reason}]
        return {**self._envelope(self.obj, choices), "usage": counts}

    def _chunk(
        self, delta: dict[str, Any], finish_reason: str | None, logprobs: Logprobs
    ) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": self.logprobs(logprobs)}
        return self._envelope(self.chunk_obj, [{**choice, "finish_reason": finish_reason}])

    def logprobs(self, entries: Logprobs) -> dict[str, Any] | None:
        if entries is None:
            return None

        def item(token: int, logprob: float) -> dict[str, Any]:
            text, raw = self._text(token)
            return {"token": text, "logprob": logprob, "bytes": raw}

        content = [
            {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in entries
        ]
        return {"content": content, "refusal": None}


class CompletionFormat(_Format):
    """``text_completion`` bodies and stream chunks (the legacy logprobs layout)."""

    prefix, obj, chunk_obj = "cmpl", "text_completion", "text_completion"

    def first_chunk(self) -> dict[str, Any] | None:
        return None

    def piece_chunk(self, text: str, logprobs: Logprobs) -> dict[str, Any]:
        return self._choice(text, None, logprobs)

    def final_chunk(self, finish_reason: str) -> dict[str, Any]:
        return self._choice("", finish_reason, None)

    def body(
        self, text: str, finish_reason: str, counts: dict[str, Any], logprobs: Logprobs
    ) -> dict[str, Any]:
        return {**self._choice(text, finish_reason, logprobs), "usage": counts}

    def _choice(self, text: str, finish_reason: str | None, logprobs: Logprobs) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": self.logprobs(logprobs)}
        return self._envelope(self.obj, [{**choice, "finish_reason": finish_reason}])

    def logprobs(self, entries: Logprobs) -> dict[str, Any] | None:
        if entries is None:
            return None
        tokens = [self._text(e.token)[0] for e in entries]
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self._text(t)[0]: lp for t, lp in e.top} for e in entries],
            "text_offset": [0, *itertools.accumulate(len(t) for t in tokens)][: len(tokens)],
        }
