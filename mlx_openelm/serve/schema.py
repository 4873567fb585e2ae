"""OpenAI's request shapes for the server: parse and check; errors in OpenAI's shape.

Pure functions with no HTTP in them (responses are built in :mod:`mlx_openelm.serve.responses`).
Requests are checked field by field and a bad value raises :class:`APIError` naming the field,
the value and what would be valid; fields this server does not know are ignored, as OpenAI's own
API ignores what it does not need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import GenerationError
from ..generate_options import GenerationOptions

__all__ = ["APIError", "CompletionRequest", "ServerSettings", "invalid", "parse_request"]

# The server's defaults, in one place (the CLI reads them; this module imports no MLX).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_SERVE_MAX_TOKENS = 512
DEFAULT_MAX_QUEUE = 8
DEFAULT_MAX_BATCH = 8  # sequences decoded together
# The prompt-prefix caches' KV arrays (mlx_openelm.prompt_cache). 1 GiB: ~64 full 2048-token
# conversations of OpenELM-270M (float16 KV: ~16 KiB a token), ~9 of 3B.
DEFAULT_CACHE_BYTES = 2**30

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
_INT_MAX = 2**31 - 1  # token counts: beyond this, int32 arithmetic in MLX overflows


class APIError(Exception):
    """A request the server refuses, in OpenAI's error shape (``{"error": {...}}``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind, "param": self.param}
        return {"error": {**error, "code": self.code}}


def invalid(param: str, message: str) -> APIError:
    """A 400 for one field: ``"`temperature` must be >= 0, got -1"``."""
    return APIError(400, f"`{param}` {message}", param=param)


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Server options; ``generation`` fills in the fields a request omits.

    Its ``max_tokens`` defaults to 512; the rest are :class:`GenerationOptions`' defaults
    (greedy, no nucleus).
    """

    api_key: str | None = None
    generation: GenerationOptions = field(
        default_factory=lambda: GenerationOptions(max_tokens=DEFAULT_SERVE_MAX_TOKENS)
    )
    max_queue: int = DEFAULT_MAX_QUEUE
    # Generation fields the operator set; the model's defaults (Apple's for Instruct models,
    # generation_config.json) fill in only the others, see mlx_openelm.decoding_defaults.
    explicit: frozenset[str] = frozenset()
    max_batch: int = DEFAULT_MAX_BATCH
    cache_bytes: int = DEFAULT_CACHE_BYTES
    allowed_origins: tuple[str, ...] = ()  # CORS: none by default; "*" allows every origin
    prompt_cache_file: str | None = None  # a saved system-prompt prefix (mlx-lm's format)
    cache_system_prompt: str | None = None  # builds prompt_cache_file when it does not exist
    adapter: str | None = None  # the adapter applied to every request, for /v1/models

    def check(self) -> None:
        """Raises GenerationError or ServeError for a value out of range."""
        from ..errors import ServeError

        self.generation.validate()
        if self.max_queue < 0:
            raise ServeError(f"--max-queue must be >= 0 (0 = no waiting), got {self.max_queue}")
        if self.max_batch < 1:
            raise ServeError(f"--max-batch must be >= 1 (1 = one at a time), got {self.max_batch}")
        if self.cache_bytes < 0:
            raise ServeError(f"--cache-bytes must be >= 0 (0 = no cache), got {self.cache_bytes}")


@dataclass(frozen=True, kw_only=True)
class CompletionRequest:
    """One checked request to ``/v1/chat/completions`` (``chat``) or ``/v1/completions``.

    ``options`` holds the request's generation options over the server's defaults;
    ``max_tokens`` is None when the request leaves it to the server. ``top_logprobs`` is None
    without logprobs, else how many alternatives to list per token.
    """

    chat: bool
    messages: list[dict[str, str]] | None
    prompt: str | list[int] | None
    max_tokens: int | None
    options: GenerationOptions
    stream: bool
    include_usage: bool
    top_logprobs: int | None


def parse_request(
    body: Mapping[str, Any],
    *,
    chat: bool,
    defaults: GenerationOptions,
    vocab_size: int | None = None,
) -> CompletionRequest:
    """Check a request body; ``defaults`` fill in the generation fields it omits.

    ``vocab_size`` bounds the ids of ``logit_bias``.

    Raises:
        APIError: 400 naming the first bad field.
    """
    for name in ("n", "best_of"):
        _integer(body, name, minimum=1, maximum=1)
    if chat:
        max_tokens = _integer(body, "max_completion_tokens", minimum=1, maximum=_INT_MAX)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", minimum=1, maximum=_INT_MAX)
        top_logprobs = None
        if _boolean(body, "logprobs", False):
            top_logprobs = _integer(body, "top_logprobs", 0, minimum=0, maximum=MAX_TOP_LOGPROBS)
    else:
        if _boolean(body, "echo", False):
            raise invalid("echo", "is not supported; send false or leave it out")
        max_tokens = _integer(body, "max_tokens", minimum=1, maximum=_INT_MAX)
        top_logprobs = _integer(body, "logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise invalid("stream_options", f"must be an object, got {_show(options)}")
    return CompletionRequest(
        chat=chat,
        messages=_messages(body) if chat else None,
        prompt=None if chat else _prompt(body),
        max_tokens=max_tokens,
        options=_generation(body, defaults, vocab_size),
        stream=_boolean(body, "stream", False),
        include_usage=bool(options and _boolean(options, "include_usage", False)),
        top_logprobs=top_logprobs,
    )


# OpenAI's request field for each GenerationOptions field a request may set.
_REQUEST_FIELDS = {
    "temp": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "repetition_context_size": "repetition_context_size",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "prompt_lookup_num_tokens": "prompt_lookup_num_tokens",
    "prompt_lookup_max_ngram": "prompt_lookup_max_ngram",
    "prompt_lookup_min_ngram": "prompt_lookup_min_ngram",
}
_INTEGERS = {"top_k", "repetition_context_size", "seed"}
_INTEGERS |= {"prompt_lookup_num_tokens", "prompt_lookup_max_ngram", "prompt_lookup_min_ngram"}


def _generation(
    body: Mapping[str, Any], defaults: GenerationOptions, vocab_size: int | None = None
) -> GenerationOptions:
    """The request's options: JSON types checked here, ranges by GenerationOptions' own rules."""
    changes: dict[str, Any] = {}
    for name, param in _REQUEST_FIELDS.items():
        value = _integer(body, param) if name in _INTEGERS else _number(body, param)
        if value is not None:
            changes[name] = value
    if changes.get("prompt_lookup_num_tokens") == 0:  # 0 turns the server's default off
        changes["prompt_lookup_num_tokens"] = None
    scope = body.get("repetition_scope")
    if scope is not None:
        changes["repetition_scope"] = scope if isinstance(scope, str) else _show(scope)
    bias = _logit_bias(body)
    if bias is not None:
        changes["logit_bias"] = bias
    stop = _stop(body)
    schema = _response_format(body)
    if schema is not None:
        changes["json_schema"] = schema
    options = defaults.replace(**changes, stop=stop or defaults.stop)
    bad = options.out_of_range()
    if bad is not None:
        name, valid, _ = bad
        param = _REQUEST_FIELDS.get(name, name)
        raise invalid(param, f"must be {valid}, got {getattr(options, name)}")
    low, high = options.prompt_lookup_min_ngram, options.prompt_lookup_max_ngram
    if low > high:
        raise invalid(
            "prompt_lookup_min_ngram",
            f"must be at most `prompt_lookup_max_ngram` ({high}), got {low}",
        )
    try:
        options.check_logit_bias(vocab_size)
    except GenerationError as e:
        raise invalid("logit_bias", str(e).removeprefix("logit_bias (--logit-bias) ")) from e
    return options


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _response_format(body: Mapping[str, Any]) -> str | None:
    """OpenAI's ``response_format`` as the schema text to constrain decoding with (None: text).

    ``{"type": "json_object"}`` is any JSON object; ``{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": ...}}`` that schema (``strict`` or not: the grammar
    always holds). The schema is compiled here, so a bad one is a 400 before any generation.
    """
    from ..errors import MissingDependencyError
    from ..structured import JSON_OBJECT_SCHEMA, compile_schema, schema_text

    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind not in RESPONSE_FORMATS:
        shown = _show(kind if isinstance(fmt, Mapping) else fmt)
        raise invalid(
            "response_format",
            f"must be an object with `type` 'text', 'json_object' or 'json_schema', got {shown}",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = JSON_OBJECT_SCHEMA
    else:
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise invalid(
                "response_format",
                "of type 'json_schema' needs `json_schema: {name, schema: {...}}` with the "
                f"schema as an object, got {_show(spec)}",
            )
    try:
        text = schema_text(schema)
        compile_schema(text)
    except MissingDependencyError as e:
        raise APIError(400, str(e), param="response_format", code="missing_dependency") from e
    except GenerationError as e:  # SchemaError
        raise invalid("response_format", f"has a schema this server cannot use: {e}") from e
    return text


def _logit_bias(body: Mapping[str, Any]) -> dict[int, float] | None:
    """OpenAI's ``{"token id": bias}`` (ids as JSON strings) as ``{int: float}``."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise invalid("logit_bias", f"must be an object of token id -> bias, got {_show(bias)}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid("logit_bias", f"keys must be token ids, got {_show(key)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid("logit_bias", f"values must be numbers, got {_show(value)}")
        out[token] = float(value)
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _boolean(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"must be true or false, got {_show(value)}")
    return value


def _integer(
    body: Mapping[str, Any],
    name: str,
    default: int | None = None,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"must be an integer, got {_show(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (
            f"= {minimum}"
            if minimum == maximum
            else f">= {minimum}"
            if maximum is None
            else f"between {minimum} and {maximum}"
        )
        raise invalid(name, f"must be {bounds}, got {value}")
    return value


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, f"must be a number, got {_show(value)}")
    return float(value)


def _stop(body: Mapping[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise invalid(
            "stop",
            f"must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, "
            f"got {_show(stop)}",
        )
    return stops or None


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid(
            "messages",
            f"must be a non-empty list of {{role, content}} objects, got {_show(messages)}",
        )
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise invalid(where, f"must be a {{role, content}} object, got {_show(message)}")
        role = message.get("role")
        role = "system" if role == "developer" else role  # OpenAI's newer name for system
        if role not in ("system", "user", "assistant"):
            raise invalid(
                f"{where}.role",
                f"must be 'system', 'user' or 'assistant' (the chat template knows no other), "
                f"got {_show(role)}",
            )
        content = _content(message.get("content"), f"{where}.content", role)
        out.append({"role": role, "content": content})
    return out


def _content(content: Any, where: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, Mapping)]
        if len(texts) == len(content) and all(
            p.get("type") == "text" and isinstance(t, str) for p, t in zip(content, texts)
        ):
            return "".join(texts)
    raise invalid(
        where,
        f"must be a string or a list of {{type: 'text', text}} parts (this model reads text "
        f"only), got {_show(content)}",
    )


def _prompt(body: Mapping[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return list(prompt)
    raise invalid(
        "prompt",
        f"must be a non-empty string or a list of token ids (one prompt per request), got "
        f"{_show(prompt)}",
    )
