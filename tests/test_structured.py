"""Structured output (mlx_openelm.structured): the grammar mask against an independent prefix
check, replies of tiny random models validated with ``jsonschema``, the options and the CLI."""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model_dir, one_error_line
from typer.testing import CliRunner

pytest.importorskip("llguidance", reason='structured output needs: pip install -e ".[json]"')
jsonschema = pytest.importorskip("jsonschema", reason="the dev extra has jsonschema")

import mlx_openelm  # noqa: E402
from mlx_openelm import structured  # noqa: E402
from mlx_openelm.cli import app  # noqa: E402
from mlx_openelm.detokenizer import BYTE, SPECIAL  # noqa: E402
from mlx_openelm.errors import GenerationError, MissingDependencyError, SchemaError  # noqa: E402
from mlx_openelm.generate import GenerationOptions, stream_generate  # noqa: E402
from mlx_openelm.tokenizer import Tokenizer  # noqa: E402

runner = CliRunner()

# A schema with a finite language: every valid reply can be listed (see _replies).
FINITE = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 12},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "pos": {
            "type": "object",
            "properties": {"x": {"enum": [0, 1]}},
            "required": ["x"],
            "additionalProperties": False,
        },
    },
    "required": ["color", "size", "ok", "tags", "pos"],
    "additionalProperties": False,
}

# Bounded schemas (a random model would otherwise write digits or keys forever) covering
# nested objects, enums, arrays, integers, numbers, booleans, strings and required fields.
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "role": {"enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "number", "minimum": -5, "maximum": 5, "multipleOf": 0.25},
                    "y": {"type": "integer", "minimum": -100, "maximum": 100},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["point", "ok"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 1, "maximum": 9},
                        "color": {"enum": ["red", "green"]},
                    },
                    "required": ["id", "color"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "finite": FINITE,
}


def _replies() -> list[bytes]:
    """Every reply valid under FINITE, in the fixed layout (``json.dumps``'s separators, the
    schema's property order): the language the grammar must accept, written independently."""
    tags = [list(t) for n in range(3) for t in itertools.product("ab", repeat=n)]
    values = itertools.product(["red", "green", "blue"], range(1, 13), [True, False], tags, [0, 1])
    return [
        json.dumps({"color": c, "size": s, "ok": o, "tags": t, "pos": {"x": x}}).encode()
        for c, s, o, t, x in values
    ]


def _token_bytes(tok: Tokenizer) -> list[bytes | None]:
    """Each id's bytes as it decodes (None for BOS, EOS, UNK), from the piece table."""
    return [
        None if kind == SPECIAL else bytes([b]) if kind == BYTE else text.encode()
        for kind, text, b in tok.pieces
    ]


def _allowed(processor: Any, history: list[int], width: int) -> set[int]:
    logits = processor(mx.array(history, dtype=mx.uint32), mx.zeros((1, width)))
    return set(np.flatnonzero(np.isfinite(np.array(logits[0]))).tolist())


@pytest.fixture(scope="module")
def real_tok(llama2_tokenizer: Path) -> Tokenizer:
    return Tokenizer(llama2_tokenizer)


@pytest.fixture(scope="module")
def tiny_tok(tiny_spm: Path) -> Tokenizer:
    return Tokenizer(tiny_spm)


@pytest.mark.parametrize("which", ["llama2", "tiny"])
def test_mask_equals_an_independent_prefix_check(which, request):
    """At every step of random walks through FINITE: the allowed tokens are exactly those whose
    bytes keep the reply a prefix of some valid reply (EOS: exactly when it is complete) —
    except where the grammar forces the next bytes, where llguidance keeps only the canonical
    tokenization of them: there the allowed tokens are a non-empty subset of those."""
    tok = request.getfixturevalue("real_tok" if which == "llama2" else "tiny_tok")
    replies = _replies()
    prefixes = {r[:i] for r in replies for i in range(len(r) + 1)}
    complete = set(replies)
    pieces = _token_bytes(tok)
    schema = json.dumps(FINITE)
    width = tok.vocab_size + 7  # rows past the tokenizer's vocabulary are never allowed
    prompt = tok.encode("Describe a thing:")
    compared = 0
    for seed in range(3):
        rng = random.Random(seed)
        processor = structured.json_processor(schema, tok)
        history, reply = list(prompt), b""
        while True:
            allowed = _allowed(processor, history, width)
            valid = {i for i, b in enumerate(pieces) if b and reply + b in prefixes}
            if reply in complete:
                valid.add(tok.eos_id)
            nexts = {r[len(reply)] for r in replies if r.startswith(reply) and r != reply}
            assert allowed and allowed <= valid, (reply, sorted(allowed - valid)[:5])
            if len(nexts) > 1 or reply in complete:  # a real choice: the sets must be equal
                assert allowed == valid, (reply, sorted(valid - allowed)[:5])
                compared += 1
            token = rng.choice(sorted(allowed))
            if token == tok.eos_id:
                break
            history.append(token)
            reply += pieces[token]
        assert reply in complete and allowed == {tok.eos_id}, reply
    assert compared >= 15  # choice points: color, size digits, ok, tags, x, EOS per walk


def test_processor_follows_a_history_that_goes_back(real_tok):
    """Prompt lookup and draft models show rejected candidates, then a shorter or different
    history: the mask is always the one of the history given (as a fresh processor's)."""
    schema = json.dumps(FINITE)
    encode = structured.ll_tokenizer(real_tok).tokenize_str  # no dummy-prefix space
    good = encode('{"color": "red", "size": 1')
    other = encode('{"color": "blue"')
    bad = encode("hello")  # the grammar never allows it
    width = real_tok.vocab_size
    proc = structured.json_processor(schema, real_tok)
    prompt = [1, 500]
    masks = [_allowed(proc, prompt, width)]  # the first call: its history is the prompt
    for step in [good, good[:3], other, [], good[:4] + bad, other[:2], good]:
        fresh = structured.json_processor(schema, real_tok)
        fresh_allowed = _allowed(fresh, prompt, width)
        for n in range(1, len(step) + 1):  # a fresh processor walked step by step
            fresh_allowed = _allowed(fresh, prompt + step[:n], width)
        masks.append(_allowed(proc, prompt + step, width))
        assert masks[-1] == fresh_allowed, step
    assert masks[5] == {real_tok.eos_id}  # a history the grammar cannot follow: EOS only
    assert len(masks[1]) > 1 and masks[1] == masks[-1] and masks[3] != masks[1]
    assert masks[4] == masks[0] == {6377}  # back to the start: only '{"' (forced, canonical)


def _check(text: str, schema: dict[str, Any]) -> None:
    jsonschema.validate(json.loads(text), schema)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_spm):
    root = tmp_path_factory.mktemp("structured")
    model, tok = mlx_openelm.load(make_model_dir(root / "m", tiny_spm, seed=0))
    draft, _ = mlx_openelm.load(
        make_model_dir(root / "d", tiny_spm, seed=5, num_transformer_layers=2)
    )
    return model, tok, draft


@pytest.mark.parametrize("mode", ["plain", "lookup", "draft"])
def test_every_sampled_reply_validates(models, mode):
    """Greedy and sampled replies of a tiny random model, with plain decoding, prompt lookup
    and a draft model: every one ends (EOS after the value) and validates."""
    model, tok, draft = models
    extra: dict[str, Any] = {
        "plain": {},
        "lookup": {"prompt_lookup_num_tokens": 4},
        "draft": {"draft_model": draft, "num_draft_tokens": 3},
    }[mode]
    seen = set()
    prompt = 'Reply in JSON: {"name": "x", "items": [1, 2]} '
    for (name, schema), (temp, seed) in itertools.product(
        SCHEMAS.items(), [(0.0, 0), (1.0, 1), (3.0, 2), (3.0, 3)]
    ):
        rs = list(
            stream_generate(model, tok, prompt, max_tokens=150, temp=temp, seed=seed,
                            json_schema=schema, **extra)
        )  # fmt: skip
        text = "".join(r.text for r in rs)
        assert rs[-1].finish_reason == "stop" and rs[-1].token == tok.eos_id, (name, text)
        _check(text, schema)
        seen.add(text)
        if temp == 0 and mode != "plain":  # greedy: lookup and drafts change nothing
            plain = mlx_openelm.generate(model, tok, prompt, 150, json_schema=schema)
            assert text == plain, name
    assert len(seen) >= 8  # sampling explored, not one reply per schema


def test_the_mask_is_applied_after_penalties_and_bias(models):
    """The grammar is the last processor, and a +100 bias on '{' (allowed only first) with a
    repetition penalty gets no disallowed token through."""
    model, tok, _ = models
    opts = GenerationOptions(json_schema="{}", logit_bias={5: 1.0}, repetition_penalty=1.3)
    processors = opts.logits_processors(start=3, tokenizer=tok)
    assert len(processors) == 3 and isinstance(processors[-1], structured.JsonLogitsProcessor)
    brace = tok.encode("{", add_bos=False)[-1]
    schema = SCHEMAS["person"]
    for seed in range(3):
        text = mlx_openelm.generate(
            model, tok, "hi", max_tokens=80, temp=1.0, seed=seed, json_schema=schema,
            logit_bias={brace: 100.0}, repetition_penalty=1.5,
        )  # fmt: skip
        _check(text, schema)


def test_schema_as_dict_or_text_and_its_rules():
    opts = GenerationOptions(json_schema={"type": "object", "properties": {"b": {}, "a": {}}})
    assert opts.json_schema == '{"type":"object","properties":{"b":{},"a":{}}}'  # order kept
    assert opts == GenerationOptions(json_schema=opts.json_schema)
    for bad, words in [
        ("[1, 2]", "must be a JSON object"),
        ("{nope", "not valid JSON"),
        ('{"description": "' + "x" * structured.MAX_SCHEMA_BYTES + '"}', "limit is 65536"),
    ]:
        with pytest.raises(SchemaError, match=words):
            GenerationOptions(json_schema=bad).validate()
    with pytest.raises(SchemaError, match="Unsatisfiable schema"):
        structured.compile_schema('{"type": "integer", "minimum": 5, "maximum": 1}')
    with pytest.raises(GenerationError, match="needs the model's tokenizer"):
        GenerationOptions(json_schema="{}").logits_processors()


def test_missing_llguidance_names_the_extra(monkeypatch):
    structured.compile_schema.cache_clear()
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install "mlx-openelm\[json\]"'):
        structured.compile_schema('{"type": "object"}')
    structured.compile_schema.cache_clear()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_spm):
    return make_model_dir(tmp_path_factory.mktemp("cli") / "m", tiny_spm, seed=0)


def test_cli_generate_json_schema_and_json(model_dir, tmp_path):
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(SCHEMAS["person"]))
    base = ["generate", "--model", str(model_dir), "-p", "hi", "--temp", "1", "--seed", "2"]
    result = runner.invoke(app, [*base, "--json-schema", str(schema_file)])
    assert result.exit_code == 0, result.output
    _check(result.stdout, SCHEMAS["person"])
    assert result.stdout.endswith("}\n") and "finish: stop" in result.stderr
    tok = Tokenizer(model_dir / "tokenizer.model")
    close = structured.ll_tokenizer(tok).tokenize_str("}")[0]
    word = structured.ll_tokenizer(tok).tokenize_str("hello")[0]
    bias = ["--logit-bias", f"{close}=30", "--logit-bias", f"{word}=100"]
    result = runner.invoke(app, [*base, "--json", *bias])  # an object, closed at once
    assert result.exit_code == 0, result.output
    assert result.stdout == "{}\n" and "finish: stop" in result.stderr
    result = runner.invoke(app, [*base, *bias, "--max-tokens", "3"])  # no grammar: the word
    assert result.stdout == tok.decode([word]) * 3 + "\n"


def test_cli_chat_replies_in_json(model_dir, tmp_path):
    schema_file = tmp_path / "s.json"
    schema_file.write_text(json.dumps(SCHEMAS["array"]))
    args = ["chat", "--model", str(model_dir), "--json-schema", str(schema_file), "--seed", "1"]
    result = runner.invoke(app, [*args, "--temp", "1"], input="hi\nagain\n/quit\n")
    assert result.exit_code == 0, result.output
    replies = [line for line in result.stdout.splitlines() if not line.startswith(">>>")]
    assert len(replies) == 2
    for reply in replies:
        _check(reply, SCHEMAS["array"])


@pytest.mark.parametrize(
    ("content", "args", "words"),
    [
        ('{"type": "strin"}', [], ("cannot be compiled", "Invalid type: strin")),
        ("[1]", [], ("must be a JSON object",)),
        ("{", [], ("not valid JSON",)),
        (b"\xff\xfe{}", [], ("cannot read the JSON schema file", "not UTF-8")),
        (None, [], ("cannot read the JSON schema file", "No such file")),
        ("{}", ["--json"], ("--json and --json-schema both set",)),
    ],
)
def test_cli_bad_schema_file_is_one_line(model_dir, tmp_path, content, args, words):
    path = tmp_path / "schema.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = runner.invoke(
        app, ["generate", "--model", str(model_dir), "-p", "hi", "--json-schema", str(path), *args]
    )
    one_error_line(result, *words)
