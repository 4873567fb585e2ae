"""Structured output over the OpenAI-compatible server, driven by the real ``openai`` client:
``response_format`` json_object and json_schema on both routes, streamed or not, every reply
validated with ``jsonschema``; bad formats and schemas are 400s naming ``response_format``, and
the server goes on serving."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the dev extra (openai)")
pytest.importorskip("starlette", reason='the server needs: pip install -e ".[serve]"')
pytest.importorskip("llguidance", reason='structured output needs: pip install -e ".[json]"')
jsonschema = pytest.importorskip("jsonschema", reason="the dev extra has jsonschema")

from test_server import _client, _raw  # noqa: E402
from test_structured import SCHEMAS  # noqa: E402

from mlx_openelm import structured  # noqa: E402
from mlx_openelm.generate import build_prompt, generate  # noqa: E402
from mlx_openelm.server import BackgroundServer, create_app  # noqa: E402

HI = [{"role": "user", "content": "Give me a record as JSON."}]


def _format(name: str) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True},
    }


@pytest.fixture(scope="module")
def url(loaded) -> Iterator[str]:
    model, tok = loaded
    with BackgroundServer(create_app(model, tok, "tiny-instruct")) as base_url:
        yield base_url


@pytest.fixture()
def client(url: str) -> openai.OpenAI:
    return _client(url)


def _valid(text: str, name: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.parametrize("name", ["person", "nested", "array"])
def test_chat_json_schema_replies_validate(client, loaded, name):
    model, tok = loaded
    for temp, seed in [(0.0, 0), (1.0, 1), (3.0, 2)]:
        r = client.chat.completions.create(
            model="x", messages=HI, temperature=temp, seed=seed, max_tokens=150,
            response_format=_format(name),
        )  # fmt: skip
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", text
        _valid(text, name)
        ids = build_prompt(tok, HI[0]["content"])
        want = generate(model, tok, ids, max_tokens=150, temp=temp, seed=seed,
                        json_schema=SCHEMAS[name])  # fmt: skip
        assert text == want  # the server decodes exactly as the library does


def test_chat_stream_and_completions(client):
    chunks = client.chat.completions.create(
        model="x", messages=HI, temperature=1.0, seed=4, max_tokens=150, stream=True,
        response_format=_format("array"),
    )  # fmt: skip
    _valid("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), "array")
    for stream in (False, True):
        r = client.completions.create(
            model="x", prompt="A person as JSON:", temperature=1.0, seed=5, max_tokens=150,
            stream=stream, extra_body={"response_format": _format("person")},
        )  # fmt: skip
        text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        _valid(text, "person")


def test_prompt_lookup_and_a_continued_conversation(client):
    """Prompt lookup (on by default for Instruct models under `serve`) over a conversation the
    prompt cache already holds: the second turn's reply validates too."""
    extra = {"prompt_lookup_num_tokens": 5, "repetition_penalty": 1.2}
    messages = list(HI)
    for _ in range(2):
        r = client.chat.completions.create(
            model="x", messages=messages, temperature=1.0, seed=7, max_tokens=150,
            response_format=_format("nested"), extra_body=extra,
        )  # fmt: skip
        text = r.choices[0].message.content
        _valid(text, "nested")
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "More"}]
    assert r.usage.prompt_tokens_details.cached_tokens > 0


def test_json_object_is_an_object_even_where_the_model_wants_otherwise(client, loaded):
    """json_object: a +100 bias on a word would make every token that word; the grammar keeps
    the reply an object, and a bias on '}' closes it at once."""
    _, tok = loaded
    encode = structured.ll_tokenizer(tok).tokenize_str
    word, close = encode("hello")[0], encode("}")[0]
    bias = {str(word): 100, str(close): 30}
    plain = client.chat.completions.create(model="x", messages=HI, max_tokens=5, logit_bias=bias)
    assert not plain.choices[0].message.content.startswith("{")
    for route in ("chat", "completions"):
        kwargs = {"model": "x", "max_tokens": 20, "logit_bias": bias}
        if route == "chat":
            fmt: Any = {"type": "json_object"}
            choice = client.chat.completions.create(messages=HI, response_format=fmt, **kwargs)
            text = choice.choices[0].message.content
        else:
            fmt = {"response_format": {"type": "json_object"}}
            choice = client.completions.create(prompt="x", extra_body=fmt, **kwargs)
            text = choice.choices[0].text
        assert choice.choices[0].finish_reason == "stop", text
        assert json.loads(text) == {}


def test_text_format_is_plain_decoding(client, loaded):
    a = client.chat.completions.create(model="x", messages=HI, max_tokens=8)
    b = client.chat.completions.create(
        model="x", messages=HI, max_tokens=8, response_format={"type": "text"}
    )
    assert a.choices[0].message.content == b.choices[0].message.content


BAD_FORMATS = [
    ({"type": "xml"}, "'text', 'json_object' or 'json_schema'"),
    ("json", "'text', 'json_object' or 'json_schema'"),
    ({"type": "json_schema"}, "needs `json_schema: {name, schema: {...}}`"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}, "schema as an object"),
    (
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "strin"}}},
        "Invalid type: strin",
    ),
    (
        {
            "type": "json_schema",
            "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 1}},
        },
        "Unsatisfiable schema",
    ),
    (
        {"type": "json_schema", "json_schema": {"schema": {"description": "x" * 70_000}}},
        "limit is 65536",
    ),
]


@pytest.mark.parametrize(("fmt", "words"), BAD_FORMATS)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_bad_response_format_is_400_naming_it(url, path, fmt, words):
    body = {"messages": HI} if "chat" in path else {"prompt": "hi"}
    status, error = _raw(url, "POST", path, json.dumps({**body, "response_format": fmt}).encode())
    assert status == 400, error
    assert error["error"]["param"] == "response_format"
    assert error["error"]["type"] == "invalid_request_error"
    assert words in error["error"]["message"]


def test_openai_client_sees_the_400_and_the_server_keeps_serving(client, loaded):
    """A long plain generation runs while bad schemas arrive: they are refused at once, it
    finishes, and the next json request is served."""
    model, tok = loaded
    done: dict[str, Any] = {}

    def long_request() -> None:
        r = client.chat.completions.create(model="x", messages=HI, max_tokens=300)
        done["finish"] = r.choices[0].finish_reason

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.2)
    for fmt, _ in BAD_FORMATS[:5]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="x", messages=HI, response_format=fmt)
        assert e.value.param == "response_format"
    worker.join(60)
    assert done.get("finish") in ("stop", "length")
    r = client.chat.completions.create(
        model="x", messages=HI, max_tokens=150, response_format=_format("person")
    )
    _valid(r.choices[0].message.content, "person")


def test_missing_llguidance_is_400_naming_the_extra(url, monkeypatch):
    structured.compile_schema.cache_clear()
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    try:
        body = {"messages": HI, "response_format": {"type": "json_object"}}
        status, error = _raw(url, "POST", "/v1/chat/completions", json.dumps(body).encode())
    finally:
        structured.compile_schema.cache_clear()
    assert status == 400 and error["error"]["param"] == "response_format"
    assert 'pip install "mlx-openelm[json]"' in error["error"]["message"]
    monkeypatch.undo()
    status, _ = _raw(url, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200


def test_logprobs_list_only_tokens_the_grammar_allows(client):
    """Masked tokens (logprob -inf) are no alternatives: forced steps list one token, and the
    body stays JSON (it has no -Infinity)."""
    r = client.chat.completions.create(
        model="x", messages=HI, max_tokens=150, logprobs=True, top_logprobs=5,
        response_format=_format("person"),
    )  # fmt: skip
    _valid(r.choices[0].message.content, "person")
    entries = r.choices[0].logprobs.content
    assert len(entries[0].top_logprobs) == 1 and entries[0].logprob == 0.0  # '{"' is forced
    assert any(len(e.top_logprobs) == 5 for e in entries)  # the name's characters: a choice
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)
