"""Generation options: one frozen :class:`GenerationOptions` with its defaults and checks.

What the CLI builds from its flags, what :class:`~.chat.ChatSession` holds, what the server
parses a request into and what :func:`~.generate.stream_generate` takes. A new option is a field
here with its default, a rule in ``_RULES`` (the range and the text that explains it), its flag
in ``FLAGS`` and, when it shapes decoding, a line in :meth:`GenerationOptions.sampler` or
:meth:`GenerationOptions.logits_processors`; then one row of ``cli_generate.GENERATION_FLAGS``
gives ``generate`` and ``chat`` the flag, and one entry of ``serve.schema._REQUEST_FIELDS`` the
server's request field. :class:`StopMatcher` cuts streamed text at stop strings without ever
showing part of one. No MLX or mlx-lm import at module level, so it is cheap to import;
:mod:`mlx_openelm.generate` re-exports it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .choices import RepetitionScope, values
from .errors import GenerationError, short

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MIN_P",
    "DEFAULT_NUM_DRAFT",
    "DEFAULT_REPETITION_CONTEXT",
    "DEFAULT_TEMP",
    "DEFAULT_TOP_K",
    "DEFAULT_TOP_P",
    "FLAGS",
    "KV_BITS",
    "GenerationOptions",
    "RepetitionScope",
    "StopMatcher",
]

# Defaults in one place: GenerationOptions' fields and the CLI's option defaults read these.
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0
DEFAULT_MIN_P = 0.0
DEFAULT_REPETITION_CONTEXT = 20
DEFAULT_NUM_DRAFT = 3
DEFAULT_KV_GROUP_SIZE = 64
KV_BITS = (2, 3, 4, 5, 6, 8)
# The longest n-gram prompt lookup matches: 4, as llama.cpp's lookup and vLLM's
# prompt_lookup_max examples (Hugging Face's max_matching_ngram_size defaults to 2). Measured on
# the trained checkpoint (RESULTS.md, Decoding): a 3- or 4-token match predicts the next token
# far more often than a 2-token one, so the candidates are accepted more, at no cost elsewhere.
DEFAULT_LOOKUP_NGRAM = 4
DEFAULT_LOOKUP_MIN_NGRAM = 1  # vLLM's prompt_lookup_min; Hugging Face always goes down to 1
MAX_LOOKUP_TOKENS = 64  # more candidates than this cost a long verification for nothing

REPETITION_SCOPES = values(RepetitionScope)
LOGIT_BIAS_LIMIT = 100.0  # OpenAI accepts biases in [-100, 100]

# The CLI flag of each option, for error messages.
FLAGS = {
    "max_tokens": "--max-tokens",
    "temp": "--temp",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "repetition_context_size": "--repetition-context-size",
    "max_kv_size": "--max-kv-size",
    "kv_bits": "--kv-bits",
    "num_draft_tokens": "--num-draft",
    "seed": "--seed",
    "stop": "--stop",
    "repetition_scope": "--repetition-scope",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "logit_bias": "--logit-bias",
    "prompt_lookup_num_tokens": "--prompt-lookup",
    "prompt_lookup_max_ngram": "--prompt-lookup-ngram",
    "prompt_lookup_min_ngram": "--prompt-lookup-min-ngram",
    "json_schema": "--json-schema",
}


_INT_MAX = 2**31 - 1  # counts and sizes: beyond this mlx-lm's int32 arithmetic overflows


def _number(test: Callable[[float], bool]) -> Callable[[Any], bool]:
    """A rule for a float option: a real, finite number (not a bool, not a string) passing
    ``test``."""
    return lambda v: (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and test(v)
    )


def _integer(low: int, high: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: type(v) is int and low <= v <= high), f"an integer from {low} to {high}"


# field -> (is the value valid, what valid means, a hint for the CLI). None is valid for the
# optional fields (repetition_penalty, seed, max_kv_size, kv_bits) and is never passed to a
# rule. Every rule checks the type too: the server and the Python API pass values unparsed.
_RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "max_tokens": (*_integer(1, _INT_MAX), ""),
    "temp": (_number(lambda v: v >= 0), ">= 0", "(0 = greedy)"),
    "top_p": (_number(lambda v: 0 < v <= 1), "in (0, 1]", "(1 = off)"),
    "top_k": (*_integer(0, _INT_MAX), "(0 = off)"),
    "min_p": (_number(lambda v: 0 <= v <= 1), "in [0, 1]", "(0 = off)"),
    "repetition_penalty": (
        _number(lambda v: v > 0),
        "> 0",
        "(1 = off; 1.1-1.3 discourages repeats)",
    ),
    "repetition_context_size": (*_integer(1, _INT_MAX), ""),
    "seed": (*_integer(0, 2**64 - 1), ""),  # MLX seeds with an unsigned 64-bit integer
    "max_kv_size": (*_integer(1, _INT_MAX), ""),
    "kv_bits": (lambda v: type(v) is int and v in KV_BITS, f"one of {KV_BITS}", ""),
    "kv_group_size": (lambda v: type(v) is int and v in (32, 64, 128), "32, 64 or 128", ""),
    "quantized_kv_start": (*_integer(0, _INT_MAX), ""),
    "num_draft_tokens": (*_integer(1, 1024), ""),
    "repetition_scope": (
        lambda v: v in REPETITION_SCOPES,
        "'context' or 'window'",
        "(context: every token, as Hugging Face; window: the last repetition_context_size)",
    ),
    "presence_penalty": (_number(lambda v: -2 <= v <= 2), "in [-2, 2]", "(0 = off)"),
    "frequency_penalty": (_number(lambda v: -2 <= v <= 2), "in [-2, 2]", "(0 = off)"),
    "prompt_lookup_num_tokens": (
        *_integer(1, MAX_LOOKUP_TOKENS),
        "(Apple suggests 10; 0 or leaving it out: plain decoding)",
    ),
    "prompt_lookup_max_ngram": (*_integer(1, 8), "(Hugging Face uses 2)"),
    "prompt_lookup_min_ngram": (*_integer(1, 8), "(1: any matching token proposes)"),
}


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """How to generate: length, sampling, repetition penalty, stop strings, KV cache, drafting.

    Args:
        max_tokens: the most tokens to generate.
        temp, top_p, top_k, min_p: sampling (``temp=0`` is greedy; mlx-lm's ``make_sampler``).
        repetition_penalty, repetition_context_size: mlx-lm's repetition logits processor.
        seed: seeds MLX's random generator first, for reproducible sampling.
        stop: strings that end generation (kept as a tuple).
        max_kv_size: keep at most this many tokens in a rotating KV cache.
        kv_bits, kv_group_size, quantized_kv_start: quantize the KV cache once it holds
            ``quantized_kv_start`` tokens (0: from the start; mlx-lm's default of 5000 is never
            reached in OpenELM's 2048-token context).
        num_draft_tokens: tokens a draft model proposes per step (speculative decoding).
        repetition_scope: ``"window"`` (mlx-lm: the last ``repetition_context_size`` tokens)
            or ``"context"`` (Hugging Face, as in Apple's examples: every token of the prompt
            and the reply), see :mod:`mlx_openelm.penalties`.
        presence_penalty, frequency_penalty: OpenAI's, over the tokens generated so far.
        logit_bias: ``{token_id: bias}`` added to the logits (kept as sorted pairs).
        prompt_lookup_num_tokens: prompt-lookup decoding with up to N candidates per step
            (None: off), matching suffix n-grams of at most ``prompt_lookup_max_ngram`` tokens
            and at least ``prompt_lookup_min_ngram`` (shorter matches propose nothing).
        json_schema: constrain the output to JSON valid under this JSON Schema: its JSON text
            (``{"type": "object"}`` for any object) or a dict, kept as compact text in its own
            key order (the order properties are written in); at most 64 KiB. See
            :mod:`mlx_openelm.structured`.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temp: float = DEFAULT_TEMP
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    repetition_penalty: float | None = None
    repetition_context_size: int = DEFAULT_REPETITION_CONTEXT
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_kv_size: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_kv_start: int = 0
    num_draft_tokens: int = DEFAULT_NUM_DRAFT
    repetition_scope: str = "window"
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_lookup_num_tokens: int | None = None
    prompt_lookup_max_ngram: int = DEFAULT_LOOKUP_NGRAM
    prompt_lookup_min_ngram: int = DEFAULT_LOOKUP_MIN_NGRAM
    json_schema: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, Mapping):  # the API's dict form: kept as its text
            from .structured import schema_text

            object.__setattr__(self, "json_schema", schema_text(self.json_schema))
        # A list (from Typer or JSON) becomes a tuple, so options stay hashable and unshared.
        stop = () if self.stop is None else self.stop
        object.__setattr__(self, "stop", (stop,) if isinstance(stop, str) else tuple(stop))
        bias = self.logit_bias or ()
        pairs = bias.items() if isinstance(bias, Mapping) else bias
        object.__setattr__(self, "logit_bias", tuple(sorted(pairs)))
        scope = getattr(self.repetition_scope, "value", self.repetition_scope)  # an Enum
        object.__setattr__(self, "repetition_scope", scope)

    @classmethod
    def of(cls, options: GenerationOptions | None = None, **changes: Any) -> GenerationOptions:
        """``options`` (default: all defaults) with ``changes`` applied (keyword-form callers).

        Raises:
            TypeError: a keyword that is not an option.
        """
        base = options if options is not None else cls()
        return dataclasses.replace(base, **changes) if changes else base

    def replace(self, **changes: Any) -> GenerationOptions:
        return dataclasses.replace(self, **changes)

    def out_of_range(self) -> tuple[str, str, str] | None:
        """The first option out of range as ``(field, what valid means, hint)``, or None.

        The server words its own message from this (with its request field names); the range
        itself is written once, here.
        """
        for name, (ok, valid, hint) in _RULES.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                return name, valid, hint
        return None

    def validate(self) -> GenerationOptions:
        """Check every option with an actionable message; returns ``self`` for chaining.

        Raises:
            GenerationError: the first option out of range, or options that cannot combine.
        """
        bad = self.out_of_range()
        if bad is not None:
            name, valid, hint = bad
            flag = f" ({FLAGS[name]})" if name in FLAGS else ""
            must = f"{valid} {hint}" if hint else valid
            value = short(repr(getattr(self, name)), 60)
            raise GenerationError(f"{name}{flag} must be {must}, got {value}")
        if self.kv_bits is not None and self.max_kv_size is not None:
            raise GenerationError(
                "kv_bits (--kv-bits) cannot be combined with max_kv_size (--max-kv-size): mlx-lm "
                "cannot quantize a rotating cache; drop one of them"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s or not _is_utf8(s):
                raise GenerationError(
                    f"stop strings (--stop) must be non-empty UTF-8 text, got {short(repr(s))}"
                )
        self.check_logit_bias()
        if self.json_schema is not None:
            from .structured import schema_text

            schema_text(self.json_schema)  # JSON text of an object, within the size limit
        if self.prompt_lookup_min_ngram > self.prompt_lookup_max_ngram:
            raise GenerationError(
                f"prompt_lookup_min_ngram (--prompt-lookup-min-ngram) must be at most "
                f"prompt_lookup_max_ngram (--prompt-lookup-ngram), got "
                f"{self.prompt_lookup_min_ngram} > {self.prompt_lookup_max_ngram}; lower the "
                "first or raise the second"
            )
        if self.prompt_lookup_num_tokens is not None and self.max_kv_size is not None:
            raise GenerationError(
                "prompt lookup (--prompt-lookup) cannot be combined with max_kv_size "
                "(--max-kv-size): it rolls the cache back, which a rotating cache cannot do"
            )
        return self

    def check_logit_bias(self, vocab_size: int | None = None) -> None:
        """Every biased id inside the vocabulary (when known) and every bias in [-100, 100].

        Raises:
            GenerationError: naming the first bad id or bias.
        """
        for token, bias in self.logit_bias:
            if (
                isinstance(token, bool)
                or not isinstance(token, int)
                or token < 0
                or (vocab_size is not None and token >= vocab_size)
            ):
                ids = f"0..{vocab_size - 1}" if vocab_size is not None else "ids >= 0"
                raise GenerationError(
                    f"logit_bias (--logit-bias) names token {token!r}, outside the vocabulary "
                    f"({ids}); use ids from the model's tokenizer"
                )
            if not (isinstance(bias, (int, float)) and math.isfinite(bias)) or (
                abs(bias) > LOGIT_BIAS_LIMIT
            ):
                raise GenerationError(
                    f"logit_bias (--logit-bias) for token {token} must be in [-100, 100], "
                    f"got {bias!r}"
                )

    def check_with_draft(self) -> None:
        """The options a draft model cannot work with.

        Raises:
            GenerationError: a rotating cache (``max_kv_size``) with speculative decoding.
        """
        if self.max_kv_size is not None:
            raise GenerationError(
                "max_kv_size (--max-kv-size) cannot be combined with a draft model: speculative "
                "decoding rewinds the cache, which a rotating cache cannot do; drop one of them"
            )
        if self.prompt_lookup_num_tokens is not None:
            raise GenerationError(
                "prompt lookup (--prompt-lookup) and a draft model (--draft-model) both propose "
                "tokens; pick one: drop --draft-model, or set --prompt-lookup 0"
            )

    def sampler(self) -> Callable[[Any], Any]:
        """mlx-lm's sampler for these options (``temp=0``: argmax)."""
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(self.temp, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(
        self, start: int = 0, tokenizer: Any = None
    ) -> list[Callable[[Any, Any], Any]]:
        """The logits processors for these options (empty when none is on), see
        :func:`mlx_openelm.penalties.make_processors`.

        Args:
            start: where the completion starts in the token history the processors see (the
                presence and frequency penalties count the tokens from there on).
            tokenizer: the model's tokenizer; needed when ``json_schema`` is set (the grammar
                works on its vocabulary).

        With ``json_schema`` the last processor is a fresh, stateful
        :class:`~mlx_openelm.structured.JsonLogitsProcessor` (last, so that no penalty or bias
        lifts a token it masked): call this once per generation.

        Raises:
            SchemaError: the schema cannot be compiled. MissingDependencyError: llguidance is
                not installed (the ``[json]`` extra). GenerationError: a schema but no tokenizer.
        """
        from .penalties import make_processors

        processors = make_processors(
            start=start,
            repetition_penalty=self.repetition_penalty,
            repetition_scope=self.repetition_scope,
            repetition_context_size=self.repetition_context_size,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=dict(self.logit_bias),
        )
        if self.json_schema is not None:
            from .structured import json_processor

            if tokenizer is None:
                raise GenerationError(
                    "json_schema needs the model's tokenizer: pass tokenizer= to "
                    "logits_processors (the grammar works on its vocabulary)"
                )
            processors.append(json_processor(self.json_schema, tokenizer))
        return processors


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


class StopMatcher:
    """Cuts streamed text at the first stop string and holds back text that could start one.

    ``push(piece)`` returns ``(text_safe_to_show, stopped)``; ``flush()`` releases the held text
    when generation ends without a stop.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = list(stops)
        self._held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        text = self._held + piece
        # No stop string can start in text already released: that text ends in no stop prefix.
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = max((self._partial(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """Length of the longest proper prefix of ``stop`` that ``text`` ends with."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0
