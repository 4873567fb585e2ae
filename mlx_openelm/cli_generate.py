"""The ``generate`` and ``chat`` commands (registered on the app in ``cli.py``)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mlx_openelm.cli_common import (
    DEFAULT_MODEL,
    AdapterOpt,
    FrequencyOpt,
    LogitBiasOpt,
    LookupMinNgramOpt,
    LookupNgramOpt,
    MaxTokensOpt,
    MinPOpt,
    ModelOpt,
    PresenceOpt,
    PromptLookupOpt,
    RepContextOpt,
    RepPenaltyOpt,
    RepScopeOpt,
    SeedOpt,
    TempOpt,
    TokenizerOpt,
    TopKOpt,
    TopPOpt,
    err,
)
from mlx_openelm.generate_options import (
    DEFAULT_LOOKUP_MIN_NGRAM,
    DEFAULT_LOOKUP_NGRAM,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_P,
    DEFAULT_NUM_DRAFT,
    DEFAULT_REPETITION_CONTEXT,
    DEFAULT_TEMP,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    GenerationOptions,
)

if TYPE_CHECKING:  # annotations only: the converter imports MLX
    from mlx_openelm.convert import ConvertProgress

PromptOpt = Annotated[
    str | None, typer.Option("--prompt", "-p", help="Prompt text; '-' reads it from stdin.")
]
SystemOpt = Annotated[
    str | None, typer.Option("--system", help="System prompt (plain text first for base models).")
]
StopOpt = Annotated[
    list[str] | None,
    typer.Option("--stop", help="Stop before this text (repeatable); it is never printed."),
]
DraftOpt = Annotated[
    str | None,
    typer.Option("--draft-model", help="Smaller OpenELM for speculative decoding (same vocab)."),
]
NumDraftOpt = Annotated[
    int, typer.Option("--num-draft", help="Tokens the draft model proposes per step.")
]
MaxKVOpt = Annotated[
    int | None, typer.Option("--max-kv-size", help="Rotating KV cache of this many tokens.")
]
KVBitsOpt = Annotated[
    int | None, typer.Option("--kv-bits", help="Quantize the KV cache to 2, 3, 4, 5, 6 or 8 bits.")
]
RawOpt = Annotated[bool, typer.Option("--raw", help="No chat template, even for instruct models.")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Reply with one JSON object (constrained decoding).")
]
JsonSchemaOpt = Annotated[
    Path | None,
    typer.Option(
        "--json-schema",
        metavar="FILE",
        help="Reply with JSON valid under this JSON Schema file (the json extra: llguidance).",
    ),
]


# The generation flags, once: (GenerationOptions field, option type, default). A new option is
# one row here (and its field in mlx_openelm/generate_options.py); generate and chat both get it.
GENERATION_FLAGS: list[tuple[str, Any, Any]] = [
    ("max_tokens", MaxTokensOpt, DEFAULT_MAX_TOKENS),
    ("temp", TempOpt, DEFAULT_TEMP),
    ("top_p", TopPOpt, DEFAULT_TOP_P),
    ("top_k", TopKOpt, DEFAULT_TOP_K),
    ("min_p", MinPOpt, DEFAULT_MIN_P),
    ("repetition_penalty", RepPenaltyOpt, None),
    ("repetition_scope", RepScopeOpt, None),
    ("repetition_context_size", RepContextOpt, DEFAULT_REPETITION_CONTEXT),
    ("presence_penalty", PresenceOpt, 0.0),
    ("frequency_penalty", FrequencyOpt, 0.0),
    ("logit_bias", LogitBiasOpt, None),
    ("prompt_lookup_num_tokens", PromptLookupOpt, None),
    ("prompt_lookup_max_ngram", LookupNgramOpt, DEFAULT_LOOKUP_NGRAM),
    ("prompt_lookup_min_ngram", LookupMinNgramOpt, DEFAULT_LOOKUP_MIN_NGRAM),
    ("seed", SeedOpt, None),
    ("stop", StopOpt, None),
    ("num_draft_tokens", NumDraftOpt, DEFAULT_NUM_DRAFT),
    ("max_kv_size", MaxKVOpt, None),
    ("kv_bits", KVBitsOpt, None),
    ("json_object", JsonOpt, False),  # not a field: --json is json_schema {"type": "object"}
    ("json_schema", JsonSchemaOpt, None),
]


def with_generation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` the generation flags in place of its ``options`` parameter.

    Typer reads the new signature; the command receives one :class:`GenerationOptions`, checked
    before anything loads so that a bad value fails at once, and ``explicit``: the names of the
    flags the user gave (the model's defaults never replace those).
    """
    signature = inspect.signature(command, eval_str=True)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    flags = [inspect.Parameter(n, kind, default=d, annotation=t) for n, t, d in GENERATION_FLAGS]
    params = [inspect.Parameter("typer_context", kind, annotation=typer.Context)]
    for p in signature.parameters.values():
        if p.name != "explicit":
            params.extend(flags if p.name == "options" else [p])

    @functools.wraps(command)
    def run(**kwargs: Any) -> Any:
        ctx = kwargs.pop("typer_context")
        values = {name: kwargs.pop(name) for name, _, _ in GENERATION_FLAGS}
        options = options_from_flags(values, draft=bool(kwargs.get("draft_model")))
        return command(**kwargs, options=options, explicit=explicit_flags(ctx, values))

    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


def options_from_flags(values: dict[str, Any], draft: bool = False) -> GenerationOptions:
    """The generation options among a command's parameters (named like the fields), checked:
    ``--logit-bias ID=BIAS`` parsed, ``--prompt-lookup 0`` as off.

    Raises:
        GenerationError: a value out of range, or prompt lookup with a draft model (``draft``).
    """
    schema = _json_schema(values.get("json_schema"), bool(values.get("json_object")))
    fields = {f.name for f in dataclasses.fields(GenerationOptions)}
    values = {k: v for k, v in values.items() if k in fields}  # not e.g. serve's --port
    values["json_schema"] = schema
    if values.get("repetition_scope") is None:
        values.pop("repetition_scope", None)
    values["logit_bias"] = _logit_bias(values.get("logit_bias") or [])
    if values.get("prompt_lookup_num_tokens") == 0:  # 0: off, even where a model turns it on
        values["prompt_lookup_num_tokens"] = None
    options = GenerationOptions(**values).validate()
    if draft and options.prompt_lookup_num_tokens is not None:
        options.check_with_draft()  # both set: says to pick one
    return options


def explicit_flags(ctx: typer.Context, names: Iterable[str]) -> frozenset[str]:
    """The parameters among ``names`` that the user gave (command line or environment)."""
    given = {"COMMANDLINE", "ENVIRONMENT"}  # by name: Typer ships its own copy of click
    return frozenset(n for n in names if getattr(ctx.get_parameter_source(n), "name", "") in given)


def _json_schema(path: Path | None, json_object: bool) -> str | None:
    """The schema text ``--json-schema FILE`` or ``--json`` asks for, compiled already so that
    a bad schema fails before the model loads.

    Raises:
        SchemaError: both flags, an unreadable file or a schema that cannot be compiled.
        MissingDependencyError: llguidance is not installed.
    """
    from mlx_openelm.errors import SchemaError
    from mlx_openelm.structured import JSON_OBJECT_SCHEMA, compile_schema

    if path is not None and json_object:
        raise SchemaError("--json and --json-schema both set; --json-schema FILE alone is enough")
    if path is None:
        text = JSON_OBJECT_SCHEMA if json_object else None
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
            raise SchemaError(f"cannot read the JSON schema file {path}: {why}") from None
    if text is None:
        return None
    try:
        compile_schema(text)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}" if path is not None else str(e)) from None
    return text


def _logit_bias(items: list[str]) -> dict[int, float]:
    """``--logit-bias ID=BIAS`` flags as ``{id: bias}``."""
    from mlx_openelm.errors import GenerationError

    bias: dict[int, float] = {}
    for item in items:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise GenerationError(
                f"--logit-bias wants ID=BIAS (e.g. --logit-bias 29871=-100), got {item!r}"
            ) from None
        if not sep:
            raise GenerationError(f"--logit-bias wants ID=BIAS, got {item!r}")
    return bias


def _with_model_defaults(
    options: GenerationOptions, explicit: frozenset[str], model: str, instruct: bool, draft: bool
) -> GenerationOptions:
    """The options over the model's defaults (generation_config.json; Apple's for Instruct)."""
    from mlx_openelm.decoding_defaults import with_model_defaults
    from mlx_openelm.loading import resolve_model_path

    folder = resolve_model_path(model)  # already converted and cached by the load
    return with_model_defaults(options, folder, instruct=instruct, explicit=explicit, draft=draft)


def _conversion_notice(model: str) -> Callable[[ConvertProgress], None]:
    """One dim line per phase when a hub model is converted on first use."""
    phases: set[str] = set()

    def report(progress: ConvertProgress) -> None:
        if progress.phase not in phases:
            phases.add(progress.phase)
            what = "hashing the download" if progress.phase == "hash" else "converting it"
            err.print(f"First use of {model}: {what} (once; cached for later runs)", style="dim")

    return report


def _read_stdin() -> str:
    """The prompt from stdin, which must be UTF-8 (the terminal's decoding would raise)."""
    from mlx_openelm.errors import GenerationError

    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return raw.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError as e:
        raise GenerationError(
            f"the prompt on stdin is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
            f"{e.start}); re-encode it as UTF-8"
        ) from None


def _write(text: str) -> None:
    sys.stdout.write(text)  # not rich: model text must not be read as markup
    sys.stdout.flush()


@with_generation_options
def generate(
    model: ModelOpt = DEFAULT_MODEL,
    prompt: PromptOpt = None,
    system: SystemOpt = None,
    options: GenerationOptions | None = None,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    draft_model: DraftOpt = None,
    raw: RawOpt = False,
    explicit: frozenset[str] = frozenset(),
) -> None:
    """Generate text for a prompt, streamed to stdout; speed and memory go to stderr.

    Defaults come from the model's generation_config.json when it has sampling fields (not
    with --raw); otherwise greedy, no penalty, no prompt lookup.
    """
    from mlx_openelm.errors import GenerationError
    from mlx_openelm.generate import (
        build_prompt,
        check_prompt_length,
        format_stats,
        load_for_generation,
    )
    from mlx_openelm.generate import stream_generate as stream
    from mlx_openelm.lookup import LookupStats

    text = _read_stdin() if prompt == "-" else prompt
    if text is None:
        raise GenerationError("no prompt: give --prompt TEXT, or --prompt - to read stdin")
    m, tok, draft = load_for_generation(
        model, adapter, tokenizer, draft_model, on_progress=_conversion_notice(model)
    )
    ids = build_prompt(tok, text, system, raw)
    check_prompt_length(m, len(ids), (options or GenerationOptions()).max_tokens)
    if not raw:
        options = _with_model_defaults(options, explicit, model, False, draft is not None)
    last, drafted, lookup = None, 0, LookupStats()
    for r in stream(m, tok, ids, options=options, draft_model=draft, lookup_stats=lookup):
        _write(r.text)
        last, drafted = r, drafted + r.from_draft
    _write("\n")
    looked = lookup if options.prompt_lookup_num_tokens else None
    stats = format_stats(last, drafted if draft else None, looked, model=m)
    err.print(stats, style="dim", markup=False)


class _TerminalIO:
    """The chat REPL's input and output: input() (line editing on a TTY), stdout, stderr."""

    def read(self, prompt: str) -> str | None:
        try:
            line = input(prompt)
        except EOFError:
            _write("\n")
            return None
        if not sys.stdin.isatty():
            _write(line + "\n")  # piped input is not echoed: show it, so stdout reads as a chat
        return line

    def write(self, text: str) -> None:
        _write(text)

    def info(self, text: str) -> None:
        err.print(text, style="dim", markup=False)

    def error(self, text: str) -> None:
        err.print("[bold red]Error:[/] ", end="")
        err.print(text, markup=False)


@with_generation_options
def chat(
    model: ModelOpt = DEFAULT_MODEL,
    system: SystemOpt = None,
    options: GenerationOptions | None = None,
    adapter: AdapterOpt = None,
    tokenizer: TokenizerOpt = None,
    draft_model: DraftOpt = None,
    explicit: frozenset[str] = frozenset(),
) -> None:
    """Chat in the terminal: streamed replies, history kept in the KV cache, /help for commands.

    Instruct models get Apple's decoding unless set: --repetition-penalty 1.2 over the whole
    context and --prompt-lookup 10; the model's generation_config.json fields come first.
    """
    from mlx_openelm.chat import ChatSession
    from mlx_openelm.chat_repl import run_repl
    from mlx_openelm.generate import load_for_generation

    m, tok, draft = load_for_generation(
        model, adapter, tokenizer, draft_model, on_progress=_conversion_notice(model)
    )
    instruct = tok.chat_template is not None
    options = _with_model_defaults(options, explicit, model, instruct, draft is not None)
    session = ChatSession(m, tok, system=system, options=options, draft_model=draft)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    err.print(f"Chatting with {model}. /help lists commands; /quit or Ctrl-D leaves.", style="dim")
    if run_repl(session, _TerminalIO()):
        raise typer.Exit(1)  # a scripted session had a failing command or turn
