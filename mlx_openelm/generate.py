"""Text generation: mlx-lm's generation loop driving OpenELM, plus stop strings and prompts.

The loop itself is mlx-lm's (``mlx_lm.generate.stream_generate`` over ``generate_step`` or
``speculative_generate_step``, with its samplers, logits processors and KV caches); this module
adds what OpenELM users need on top: option checks with actionable errors, chat-template prompts
(``build_prompt``), stop strings that are never partly printed, a seed, quantized KV caches that
actually switch on within OpenELM's 2048-token context, and draft-model checks. The options
(:class:`GenerationOptions`, their defaults and checks) and ``StopMatcher`` live in
:mod:`mlx_openelm.generate_options` and are re-exported here.

    model, tokenizer = mlx_openelm.load("apple/OpenELM-270M-Instruct")
    ids = build_prompt(tokenizer, "Name three fruits.")
    for r in stream_generate(model, tokenizer, ids, max_tokens=64, stop=["\\n\\n"]):
        print(r.text, end="", flush=True)
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

from .errors import GenerationError, ModelNotFoundError, OpenELMWarning
from .generate_options import GenerationOptions, StopMatcher  # re-exported
from .lookup import LookupStats
from .penalties import with_history

if TYPE_CHECKING:
    from mlx_lm.generate import GenerationResponse

# mlx-lm is imported inside the functions that use it: importing it takes seconds (it pulls in
# transformers), and ``import mlx_openelm`` (hence every CLI command) imports this module.

__all__ = [
    "GenerationOptions",
    "StopMatcher",
    "build_prompt",
    "generate",
    "load_for_generation",
    "make_cache",
    "stream_generate",
]


def vocab_size(model: nn.Module) -> int:
    """Rows of the model's vocabulary (from its config, which quantization does not change)."""
    return int(model.args.vocab_size)


def check_draft_model(
    model: nn.Module, draft_model: nn.Module, options: GenerationOptions | None = None
) -> None:
    """A draft model must score the same vocabulary as the model (and fit the ``options``).

    Raises:
        GenerationError: the vocabularies differ, or an option does not work with a draft model.
    """
    if options is not None:
        options.check_with_draft()
    ours, theirs = vocab_size(model), vocab_size(draft_model)
    if ours != theirs:
        raise GenerationError(
            f"the draft model has a {theirs}-token vocabulary but the model has {ours}; "
            "speculative decoding needs the same tokenizer: use a smaller OpenELM (e.g. "
            "apple/OpenELM-270M-Instruct) as --draft-model"
        )


def check_prompt_length(model: nn.Module, prompt_tokens: int, max_tokens: int) -> None:
    """Refuse a prompt longer than the model's context; warn when the reply would run past it.

    Raises:
        GenerationError: the prompt alone does not fit the context.
    """
    context = getattr(getattr(model, "args", None), "max_context_length", None)
    if not isinstance(context, int):
        return
    if prompt_tokens > context:
        raise GenerationError(
            f"the prompt is {prompt_tokens} tokens but the model's context holds {context}; "
            f"shorten it by at least {prompt_tokens - context} tokens"
        )
    if prompt_tokens + max_tokens > context:
        warnings.warn(
            f"the prompt ({prompt_tokens} tokens) + --max-tokens {max_tokens} run past the "
            f"{context}-token context: tokens beyond position {context} are past what the model "
            "was trained on",
            OpenELMWarning,
            stacklevel=2,
        )


def check_kv_bits(model: nn.Module, kv_bits: int | None, kv_group_size: int) -> None:
    """A quantized KV cache needs the head size to be a multiple of its group size.

    Raises:
        GenerationError: ``kv_bits`` is set and this model's heads cannot be grouped.
    """
    head_dim = getattr(getattr(model, "args", None), "head_dim", None)
    if kv_bits is not None and isinstance(head_dim, int) and head_dim % kv_group_size:
        raise GenerationError(
            f"kv_bits (--kv-bits) needs the model's head size ({head_dim}) to be a multiple of "
            f"the KV quantization group ({kv_group_size}); this model cannot quantize its "
            "cache: drop --kv-bits"
        )


def make_cache(
    model: nn.Module,
    draft_model: nn.Module | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
) -> list[Any]:
    """A fresh prompt cache for ``model`` (then ``draft_model``'s layers, as mlx-lm expects).

    ``max_kv_size`` gives a rotating cache that keeps the newest tokens; ``kv_bits`` a cache
    quantized from the first token (built quantized, so that mlx-lm never has to swap list
    entries, which a speculative run would do on a copy of the list).
    """
    from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

    def one(m: nn.Module) -> list[Any]:
        if kv_bits is not None:
            return [QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) for _ in m.layers]
        return make_prompt_cache(m, max_kv_size=max_kv_size)

    return one(model) + (one(draft_model) if draft_model is not None else [])


def build_prompt(
    tokenizer: Any, prompt: str, system: str | None = None, raw: bool = False
) -> list[int]:
    """Token ids for a user prompt.

    Instruct models (the tokenizer has a chat template) get the template with an optional system
    message; base models, or ``raw=True``, get BOS + the text (the system text first, if any).

    Raises:
        GenerationError: the prompt is empty.
    """
    if not prompt.strip():
        raise GenerationError("the prompt is empty; pass --prompt TEXT (or --prompt - for stdin)")
    if tokenizer.chat_template is not None and not raw:
        messages = [{"role": "system", "content": system}] if system else []
        return tokenizer.encode_chat([*messages, {"role": "user", "content": prompt}])
    text = f"{system}\n\n{prompt}" if system else prompt
    return tokenizer.encode(text, add_special_tokens=True)


_WRAPPERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _for_mlx_lm(tokenizer: Any) -> Any:
    """The tokenizer as mlx-lm wants it, built once per tokenizer (building one takes ~70 ms:
    mlx-lm scans the vocabulary); mlx-lm resets its detokenizer at the start of every run."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer
    wrapper = _WRAPPERS.get(tokenizer)
    if wrapper is None:
        # ours: the linear-time streaming detokenizer; others: mlx-lm's default one
        make = getattr(tokenizer, "to_mlx_lm", None)
        wrapper = make() if make is not None else TokenizerWrapper(tokenizer)
        _WRAPPERS[tokenizer] = wrapper
    return wrapper


def _prompt_ids(tokenizer: Any, prompt: str | Sequence[int] | mx.array) -> mx.array:
    if isinstance(prompt, str):
        # Like mlx-lm: add BOS unless the text already starts with it.
        add_bos = not prompt.startswith(tokenizer.bos_token)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_bos)
    ids = prompt if isinstance(prompt, mx.array) else mx.array(list(prompt), dtype=mx.uint32)
    if ids.size == 0:
        raise GenerationError("the prompt has no tokens; give some text to continue")
    return ids


def stream_generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int | None = None,
    *,
    options: GenerationOptions | None = None,
    draft_model: nn.Module | None = None,
    prompt_cache: list[Any] | None = None,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    context: Sequence[int] = (),
    lookup_stats: LookupStats | None = None,
    **option_keywords: Any,
) -> Iterator[GenerationResponse]:
    """Generate text token by token; the call shape of ``mlx_lm.stream_generate``.

    Args:
        model: an OpenELM model (``mlx_openelm.load``) or any mlx-lm model.
        tokenizer: ``mlx_openelm.tokenizer.Tokenizer`` (or an mlx-lm tokenizer).
        prompt: text (BOS is added unless present; no chat template, see ``build_prompt``) or
            token ids, used as they are.
        max_tokens: the most tokens to generate (overrides ``options.max_tokens``).
        options: how to generate (:class:`GenerationOptions`; default: its defaults). Stop
            strings end generation before the first one, and text that might be the start of
            one is held back until it is known not to be.
        draft_model: a smaller model with the same vocabulary for speculative decoding;
            greedy output is unchanged, ``response.from_draft`` marks accepted draft tokens.
        prompt_cache: a cache from ``make_cache`` to extend in place (multi-turn reuse); it then
            holds the prompt and every generated token, EOS included.
        prompt_progress_callback: ``(processed, total)`` during prefill (not with a draft model).
        context: the ids ``prompt_cache`` already holds (an earlier turn): prompt lookup matches
            them and the context-scope repetition penalty counts them.
        lookup_stats: counts proposed and accepted prompt-lookup candidates, when given.
        **option_keywords: :class:`GenerationOptions` fields (``temp=0.7``, ``stop=[...]``)
            applied over ``options``: the keyword form of the same call. ``json_schema=``
            (JSON text or a dict) constrains the reply to JSON valid under that schema (the
            ``[json]`` extra); it ends with EOS once the value is complete.

    Yields:
        ``mlx_lm.generate.GenerationResponse`` per generated token: ``text`` (the new piece, may
        be empty), ``token``, ``from_draft``, running ``prompt_tokens``/``prompt_tps``,
        ``generation_tokens``/``generation_tps``, ``peak_memory`` (GB) and, on the last one,
        ``finish_reason``: ``"stop"`` (EOS or a stop string) or ``"length"``.

    Raises:
        GenerationError: an option out of range, an empty prompt or a mismatched draft model
            (``SchemaError`` for a JSON schema that cannot be compiled).
        MissingDependencyError: ``json_schema`` without llguidance installed.
    """
    from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

    if max_tokens is not None:
        option_keywords["max_tokens"] = max_tokens
    opts = GenerationOptions.of(options, **option_keywords).validate()
    opts.check_logit_bias(vocab_size(model))
    check_kv_bits(model, opts.kv_bits, opts.kv_group_size)
    if draft_model is not None:
        check_kv_bits(draft_model, opts.kv_bits, opts.kv_group_size)
    ids = _prompt_ids(tokenizer, prompt)
    # mlx-lm's speculative loop shows processors only the last prompt token before the reply
    shown = 1 if draft_model is not None and opts.prompt_lookup_num_tokens is None else ids.size
    processors = opts.logits_processors(start=len(context) + shown, tokenizer=tokenizer)
    if opts.prompt_lookup_num_tokens is not None:
        if draft_model is not None:
            opts.check_with_draft()  # says to pick one
        responses = _lookup(model, tokenizer, ids, opts, processors, prompt_cache, context,
                            lookup_stats, prompt_progress_callback)  # fmt: skip
        yield from _with_stops(responses, StopMatcher(opts.stop))
        return
    kwargs: dict[str, Any] = {
        "sampler": opts.sampler(),
        "logits_processors": with_history(processors, context),
        "prompt_cache": prompt_cache,
        "kv_bits": opts.kv_bits,
        "kv_group_size": opts.kv_group_size,
        "quantized_kv_start": opts.quantized_kv_start,
    }
    if draft_model is None:
        kwargs.update(
            max_kv_size=opts.max_kv_size, prompt_progress_callback=prompt_progress_callback
        )
    else:
        check_draft_model(model, draft_model, opts)
        kwargs["num_draft_tokens"] = opts.num_draft_tokens
    if opts.seed is not None:
        mx.random.seed(opts.seed)
    responses = mlx_lm_stream_generate(
        model, _for_mlx_lm(tokenizer), ids, opts.max_tokens, draft_model=draft_model, **kwargs
    )
    yield from _with_stops(responses, StopMatcher(opts.stop))


def _lookup(
    model: nn.Module,
    tokenizer: Any,
    ids: mx.array,
    opts: GenerationOptions,
    processors: list[Any],
    cache: list[Any] | None,
    context: Sequence[int],
    stats: LookupStats | None,
    progress: Callable[[int, int], None] | None,
) -> Iterator[GenerationResponse]:
    """Prompt-lookup decoding (:mod:`mlx_openelm.lookup`) behind mlx-lm's response shape."""
    from .lookup import Sampling, lookup_generate_step, stream_responses

    if cache is None:
        cache = make_cache(model, kv_bits=opts.kv_bits, kv_group_size=opts.kv_group_size)
    if opts.seed is not None:
        mx.random.seed(opts.seed)
    steps = lookup_generate_step(
        ids, model, cache=cache, context=context,
        num_tokens=opts.prompt_lookup_num_tokens, max_ngram=opts.prompt_lookup_max_ngram,
        min_ngram=opts.prompt_lookup_min_ngram,
        max_tokens=opts.max_tokens, logits_processors=processors, stats=stats,
        sampling=Sampling(temp=opts.temp, top_p=opts.top_p, min_p=opts.min_p, top_k=opts.top_k),
        prompt_progress_callback=progress,
    )  # fmt: skip
    return stream_responses(steps, _for_mlx_lm(tokenizer), ids.size, opts.max_tokens)


def _with_stops(
    responses: Iterator[GenerationResponse], matcher: StopMatcher
) -> Iterator[GenerationResponse]:
    try:
        for r in responses:
            text, stopped = matcher.push(r.text)
            if stopped:
                yield replace(r, text=text, finish_reason="stop")
                return
            if r.finish_reason is not None:
                text += matcher.flush()
            yield replace(r, text=text)
    finally:
        responses.close()  # promptly: a speculative generator rewinds its cache on close


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int | None = None,
    **sampling: Any,
) -> str:
    """The whole generated text; same arguments as :func:`stream_generate`."""
    return "".join(
        r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, **sampling)
    )


def load_for_generation(
    model: str | Path,
    adapter_path: str | Path | None = None,
    tokenizer: str | Path | None = None,
    draft_model: str | Path | None = None,
    on_progress: Callable[[Any], None] | None = None,
) -> tuple[nn.Module, Any, nn.Module | None]:
    """Load the model, its tokenizer and an optional draft model (folders or hub ids).

    Args:
        on_progress: given to the converter when a hub id is converted on first use (it reports
            ``mlx_openelm.convert.ConvertProgress``).

    Returns:
        ``(model, tokenizer, draft_model_or_None)``.

    Raises:
        ModelNotFoundError: a path or repo cannot be found, or a hub repo is not cached offline.
        GenerationError: the draft model's vocabulary differs from the model's.
    """
    from .loading import load, resolve_model_path

    def folder(name: str | Path) -> Path:
        with _hub_errors_as_not_found(name):
            return resolve_model_path(name, on_progress=on_progress)

    loaded, tok = load(folder(model), adapter_path=adapter_path, tokenizer=tokenizer)
    draft = None
    if draft_model is not None:
        draft, _ = load(folder(draft_model), tokenizer=tokenizer)
        check_draft_model(loaded, draft)
    return loaded, tok, draft


@contextlib.contextmanager
def _hub_errors_as_not_found(name: str | Path) -> Iterator[None]:
    """Hugging Face hub failures (offline, not cached, unknown repo) as one ModelNotFoundError.

    The converter reports these itself where it can; this is the last line before the CLI, so a
    user never sees a traceback for a repo that cannot be fetched.
    """
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    try:
        yield
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        from .loading import cache_root

        raise ModelNotFoundError(
            f"{str(name)!r} is not cached in {cache_root()} and cannot be fetched from the "
            f"Hugging Face hub ({type(e).__name__}); connect to the internet once (set HF_TOKEN "
            "for gated repos) and rerun, or pass a local model folder with --model"
        ) from e


def format_stats(
    last: GenerationResponse,
    draft_tokens: int | None = None,
    lookup: LookupStats | None = None,
    model: nn.Module | None = None,
) -> str:
    """One line of end-of-generation stats from the last response (and draft or lookup
    acceptance). A quantized ``model`` adds how it ran (``runtime.Execution``)."""
    line = (
        f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
        f"generated: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
        f"peak memory: {last.peak_memory:.3f} GB | finish: {last.finish_reason}"
    )
    if draft_tokens is not None:
        share = draft_tokens / max(last.generation_tokens, 1)
        line += f" | draft accepted: {draft_tokens}/{last.generation_tokens} ({share:.0%})"
    if lookup is not None:
        line += (
            f" | lookup: {lookup.accepted} of {lookup.proposed} proposed accepted "
            f"({lookup.acceptance:.0%})"
        )
    execution = getattr(model, "execution", None)
    if execution is not None and execution.quantization is not None:
        line += f" | weights: {execution.describe()}"
    return line
