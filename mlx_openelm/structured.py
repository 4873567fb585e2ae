"""Structured output: decoding constrained by a JSON Schema, so the reply always parses.

The grammar engine is `llguidance <https://github.com/guidance-ai/llguidance>`_ (the ``[json]``
extra; why this one and not xgrammar or outlines-core is in the README). A schema becomes an
llguidance grammar (:func:`compile_schema`, checked without a tokenizer so that a server can
refuse a bad schema before any generation), and a :class:`JsonLogitsProcessor` per generation
walks that grammar token by token: from the history it is given it advances the matcher by the
tokens sampled since its last call (rolling back first when the history went back, as prompt
lookup and speculative decoding do after a rejected candidate), then sets every token the grammar
does not allow to ``-inf``. Once the JSON value is complete only EOS is allowed, so generation
ends there.

The layout is fixed: no free whitespace, ``", "`` between items and ``": "`` after keys (the
layout of Python's ``json.dumps``), properties in the schema's order. A random or weak model
cannot pad the reply with whitespace forever, and every token it picks is content. A schema may
override this with llguidance's ``"x-guidance"`` key (e.g. ``{"whitespace_flexible": true}``).
Where the grammar forces the next bytes (``{"name": "`` before a value), llguidance allows only
the tokenizer's own tokenization of them, which keeps the text the model reads canonical.

llguidance is imported only when a schema is compiled, and its absence raises
:class:`~mlx_openelm.errors.MissingDependencyError` naming the extra.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import MissingDependencyError, SchemaError, short

__all__ = [
    "INSTALL_HINT",
    "JSON_LAYOUT",
    "JSON_OBJECT_SCHEMA",
    "MAX_SCHEMA_BYTES",
    "JsonLogitsProcessor",
    "compile_schema",
    "json_processor",
    "schema_text",
]

INSTALL_HINT = 'pip install "mlx-openelm[json]"'
# 64 KiB of schema text is far beyond any hand-written schema (OpenAI caps a schema at 100
# properties and 5 levels); the limit keeps a request from making the engine compile for seconds.
MAX_SCHEMA_BYTES = 64 * 1024
JSON_OBJECT_SCHEMA = '{"type":"object"}'  # response_format json_object, generate --json

# llguidance's JSON compile options, as defaults a schema's "x-guidance" key may override.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:
        raise MissingDependencyError(
            f"structured output (a JSON schema) needs llguidance, which is not installed: "
            f"{INSTALL_HINT}"
        ) from e
    return llguidance


def schema_text(schema: str | Mapping[str, Any]) -> str:
    """The schema as JSON text: a mapping serialized compactly (key order kept: it is the order
    properties are generated in), text checked to be one JSON object within the size limit.

    Raises:
        SchemaError: not JSON, not an object, or over :data:`MAX_SCHEMA_BYTES`.
    """
    if isinstance(schema, Mapping):
        try:
            schema = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise SchemaError(f"the JSON schema cannot be written as JSON: {e}") from None
    if not isinstance(schema, str):
        raise SchemaError(f"a JSON schema must be JSON text or a dict, got {type(schema).__name__}")
    size = len(schema.encode("utf-8", "surrogatepass"))
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError(
            f"the JSON schema is {size} bytes; the limit is {MAX_SCHEMA_BYTES} (64 KiB): "
            "use $defs/$ref for repeated parts"
        )
    try:
        value = json.loads(schema)
    except ValueError as e:
        raise SchemaError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise SchemaError(
            f"a JSON schema must be a JSON object (e.g. {JSON_OBJECT_SCHEMA}), got "
            f"{short(schema, 60)}"
        )
    return schema


@functools.lru_cache(maxsize=64)
def compile_schema(schema: str) -> str:
    """The llguidance grammar for a schema's JSON text, checked (cached by text).

    Raises:
        SchemaError: the schema is malformed or uses what llguidance cannot compile (the
            message is llguidance's, e.g. ``Unsatisfiable schema: minimum (5) is greater
            than maximum (1)``).
        MissingDependencyError: llguidance is not installed.
    """
    llg = _llguidance()
    schema = schema_text(schema)
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except ValueError as e:
        raise SchemaError(f"the JSON schema cannot be compiled: {short(e)}") from None
    problem = llg.LLMatcher.validate_grammar(grammar)
    if problem:
        raise SchemaError(f"the JSON schema cannot be compiled: {short(problem)}")
    return grammar


_LL_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of ``tokenizer``'s vocabulary, built once per tokenizer (~0.1 s).

    Our SentencePiece :class:`~mlx_openelm.tokenizer.Tokenizer` (or mlx-lm's wrapper of it):
    each id's bytes are what it decodes to (``▁`` a space, ``<0xNN>`` that byte), and BOS, EOS
    and UNK are special tokens. A Hugging Face fast tokenizer goes through ``llguidance.hf``.

    Raises:
        SchemaError: a tokenizer of another kind.
    """
    tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper
    cached = _LL_TOKENIZERS.get(tokenizer)
    if cached is None:
        llg = _llguidance()
        if hasattr(tokenizer, "pieces"):
            cached = llg.LLTokenizer(llg.TokenizerWrapper(_SentencePieceVocab(tokenizer)))
        elif type(tokenizer).__name__.endswith("Fast"):
            from llguidance.hf import from_tokenizer

            cached = from_tokenizer(tokenizer)
        else:
            raise SchemaError(
                f"structured output needs mlx-openelm's tokenizer (or a Hugging Face fast one), "
                f"got {type(tokenizer).__name__}"
            )
        _LL_TOKENIZERS[tokenizer] = cached
    return cached


class _SentencePieceVocab:
    """What ``llguidance.TokenizerWrapper`` reads: ids' bytes, special ids, and an encoder."""

    def __init__(self, tokenizer: Any) -> None:
        from .detokenizer import BYTE, SPECIAL

        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        self._byte_ids: dict[int, int] = {}
        for i, (kind, text, byte) in enumerate(tokenizer.pieces):
            if kind == BYTE:
                self.tokens.append(bytes([byte]))
                self._byte_ids[byte] = i
            else:
                self.tokens.append(text.encode("utf-8"))
                if kind == SPECIAL:
                    self.special_token_ids.append(i)
        self._sp = tokenizer._sp
        self._newline = self._sp.encode("\n")

    def __call__(self, text: str | bytes) -> list[int]:
        """Ids whose bytes are exactly ``text``. SentencePiece puts a dummy-prefix space before
        what it encodes, so the text is encoded after a newline (a byte piece, which merges
        with nothing) and the newline's ids are dropped."""
        if isinstance(text, bytes):
            raw = text
            text = text.decode("utf-8", errors="surrogateescape")
        else:
            raw = text.encode("utf-8", errors="surrogatepass")
        try:
            ids = self._sp.encode("\n" + text)
        except (RuntimeError, UnicodeError):
            ids = []
        n = len(self._newline)
        if ids[:n] == self._newline and b"".join(self.tokens[i] for i in ids[n:]) == raw:
            return ids[n:]
        return [self._byte_ids[b] for b in raw]  # byte fallback: exact for any bytes


class JsonLogitsProcessor:
    """Masks every token that would leave the JSON the grammar describes; one per generation.

    Called as ``processor(history, logits)`` once per step, like every mlx-lm logits processor:
    ``history`` holds the tokens before the row ``logits`` (``(1, V)``) scores. The tokens of
    the history at the first call are the prompt (whatever the loop puts there: mlx-lm's
    speculative loop keeps only the last prompt token), so what follows them is the reply.
    Apply it last, after penalties and biases, so nothing can lift a masked token.
    """

    def __init__(self, grammar: str, tokenizer: Any) -> None:
        llg = _llguidance()
        self._ll = ll_tokenizer(tokenizer)
        self._matcher = llg.LLMatcher(self._ll, grammar, log_level=0)
        if self._matcher.is_error():
            raise SchemaError(f"the JSON schema cannot be used: {self._matcher.get_error()}")
        self._eos = int(self._ll.eos_token)
        self._start: int | None = None  # the history's length at the first call
        self._consumed: list[int] = []  # reply tokens the matcher has taken

    def __call__(self, history: Any, logits: Any) -> Any:
        import mlx.core as mx

        mx.async_eval(logits)  # the forward pass runs while the mask is computed
        if self._start is None:
            self._start = int(history.size)
        reply = history[self._start :].tolist() if history.size > self._start else []
        allowed = self._allowed(reply, int(logits.shape[-1]))
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def _advance(self, reply: list[int]) -> bool:
        """Bring the matcher to ``reply``; False if a token of it breaks the grammar."""
        same = 0
        for a, b in zip(self._consumed, reply):
            if a != b:
                break
            same += 1
        if same < len(self._consumed):
            self._matcher.rollback(len(self._consumed) - same)
            del self._consumed[same:]
        rest = reply[same:]
        taken = self._matcher.try_consume_tokens(rest) if rest else 0
        self._consumed.extend(rest[:taken])
        return taken == len(rest)

    def _allowed(self, reply: list[int], width: int) -> np.ndarray:
        """A boolean row of ``width``: the tokens the grammar allows next (ids past the
        tokenizer's vocabulary never). A history the grammar cannot follow (a candidate that
        prompt lookup or a draft will reject anyway) or a matcher that stopped allows EOS."""
        ok = self._advance(reply)
        if ok and not self._matcher.is_error():
            bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.unpackbits(bits, bitorder="little")[:width].astype(bool)
            if allowed.size < width:
                allowed = np.concatenate([allowed, np.zeros(width - allowed.size, dtype=bool)])
            if allowed.any():
                return allowed
        allowed = np.zeros(width, dtype=bool)
        allowed[self._eos] = True
        return allowed


def json_processor(schema: str, tokenizer: Any) -> JsonLogitsProcessor:
    """A fresh :class:`JsonLogitsProcessor` for ``schema`` (JSON text) over ``tokenizer``.

    Raises:
        SchemaError: the schema cannot be compiled. MissingDependencyError: no llguidance.
    """
    return JsonLogitsProcessor(compile_schema(schema), tokenizer)
