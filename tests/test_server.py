"""The OpenAI-compatible server, driven over loopback by the official ``openai`` client.

Every server here is real (uvicorn on a free 127.0.0.1 port, on a background thread that is
always shut down) and serves the tiny random model; texts are checked against
``mlx_openelm.generate`` on the same prompt and seed, logprobs against the float64 NumPy reference.
"""

from __future__ import annotations

import http.client
import importlib
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the server tests need the dev extra (openai)")
pytest.importorskip(
    "starlette", reason='the server needs the serve extra: pip install -e ".[serve]"'
)

from conftest import make_model_dir  # noqa: E402

from mlx_openelm.errors import ServeError  # noqa: E402
from mlx_openelm.generate import build_prompt, generate  # noqa: E402
from mlx_openelm.loading import load  # noqa: E402
from mlx_openelm.server import BackgroundServer, ServerSettings, create_app  # noqa: E402

from openelm_ref import forward, log_softmax  # noqa: E402
from signals import popen_interruptible  # noqa: E402
from tiny import random_weights, tiny_config  # noqa: E402

HI = [{"role": "user", "content": "hi"}]
LONG = 1500  # tokens: several seconds of generation, so a stream can be cut off mid-way


@pytest.fixture(scope="module")
def url(loaded) -> Iterator[str]:
    model, tok = loaded
    with BackgroundServer(create_app(model, tok, "tiny-instruct")) as base_url:
        yield base_url


def _client(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture()
def client(url: str) -> openai.OpenAI:
    return _client(url)


def _raw(
    base_url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One plain HTTP request (no client-side checks); returns the status and parsed JSON."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(data) if data else None


def _wait_idle(base_url: str) -> dict[str, Any]:
    """/health once the engine has nothing running or waiting (bounded: 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        status, health = _raw(base_url, "GET", "/health")
        assert status == 200
        if not health["busy"] and health["pending"] == 0:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.02)


# --- Round trips ---------------------------------------------------------------------------


def test_chat_matches_generate(client, loaded):
    model, tok = loaded
    ids = build_prompt(tok, "hi")
    want = generate(model, tok, ids, max_tokens=12)
    r = client.chat.completions.create(model="tiny-instruct", messages=HI, max_tokens=12)
    assert r.object == "chat.completion" and r.model == "tiny-instruct"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    assert r.usage.total_tokens == len(ids) + 12


def test_chat_stream_matches_generate(client, loaded):
    model, tok = loaded
    want = generate(model, tok, build_prompt(tok, "hi"), max_tokens=12)
    stream = client.chat.completions.create(
        model="x", messages=HI, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_stream_is_server_sent_events_ending_in_done(url):
    body = {"messages": HI, "max_tokens": 3, "stream": True}
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_completions_match_generate(client, loaded):
    model, tok = loaded
    want = generate(model, tok, "Once upon a time", max_tokens=10)
    r = client.completions.create(model="x", prompt="Once upon a time", max_tokens=10)
    assert r.object == "text_completion" and r.choices[0].text == want
    streamed = client.completions.create(
        model="x", prompt="Once upon a time", max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == want
    ids = tok.encode("Once upon a time")
    by_ids = client.completions.create(model="x", prompt=ids, max_tokens=10)
    assert by_ids.choices[0].text == want and by_ids.usage.prompt_tokens == len(ids)


def test_seeded_sampling_matches_generate(client, loaded):
    model, tok = loaded
    ids = build_prompt(tok, "hi")
    want = {s: generate(model, tok, ids, max_tokens=16, temp=5.0, seed=s) for s in (1, 2)}
    assert want[1] != want[2]  # the temperature is high enough for the seed to matter
    for seed in (1, 2):
        for stream in (False, True):
            r = client.chat.completions.create(
                model="x", messages=HI, max_tokens=16, temperature=5.0, seed=seed, stream=stream
            )
            text = (
                "".join(c.choices[0].delta.content or "" for c in r)
                if stream
                else r.choices[0].message.content
            )
            assert text == want[seed], (seed, stream)


def test_stop_strings_and_repetition_penalty(client, loaded):
    model, tok = loaded
    ids = build_prompt(tok, "hi")
    full = generate(model, tok, ids, max_tokens=12, repetition_penalty=1.5)
    stop = full[3:5]
    want = generate(model, tok, ids, max_tokens=12, repetition_penalty=1.5, stop=[stop])
    assert want == full[: full.find(stop)]
    r = client.chat.completions.create(
        model="x", messages=HI, max_tokens=12, stop=stop, extra_body={"repetition_penalty": 1.5}
    )
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "stop"


def test_prompt_lookup_and_penalties_match_generate(client, loaded):
    """Prompt lookup leaves greedy text as it is; OpenAI's penalties and logit_bias shape it
    as they do in generate; a bias of +100 makes one token the only choice."""
    model, tok = loaded
    ids = build_prompt(tok, "hi")
    options = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_scope": "context",
               "repetition_penalty": 1.3}  # fmt: skip
    want = generate(model, tok, ids, max_tokens=16, **options)
    assert want != generate(model, tok, ids, max_tokens=16)
    lookup_min = {"prompt_lookup_num_tokens": 5, "prompt_lookup_min_ngram": 2}
    for lookup in ({}, {"prompt_lookup_num_tokens": 5}, lookup_min):
        body = {**options, **lookup}
        r = client.chat.completions.create(model="x", messages=HI, max_tokens=16, extra_body=body)
        assert r.choices[0].message.content == want
    forced = tok.encode("hello", add_bos=False)[-1]
    want = generate(model, tok, "a", max_tokens=5, logit_bias={forced: 100.0})
    assert want == tok.decode([forced] * 5)
    r = client.completions.create(model="x", prompt="a", max_tokens=5, logit_bias={forced: 100})
    assert r.choices[0].text == want


def test_lookup_continued_conversation_reuses_the_prompt_cache(client, loaded):
    """The prefix cache keeps what lookup leaves (all but the reply's last token)."""
    model, tok = loaded
    extra = {"prompt_lookup_num_tokens": 4}
    first = client.chat.completions.create(model="x", messages=HI, max_tokens=8, extra_body=extra)
    reply = first.choices[0].message.content
    conversation = [*HI, {"role": "assistant", "content": reply}, {"role": "user", "content": "ok"}]
    ids = tok.encode_chat(conversation)
    r = client.chat.completions.create(
        model="x", messages=conversation, max_tokens=8, extra_body=extra
    )
    assert r.choices[0].message.content == generate(model, tok, ids, max_tokens=8)
    assert r.usage.prompt_tokens_details.cached_tokens >= len(build_prompt(tok, "hi"))


def test_serve_gives_instruct_models_apples_defaults(tiny_model_dir, tiny_base_model_dir):
    from mlx_openelm.serve.app import _with_model_defaults

    settings = ServerSettings(explicit=frozenset({"repetition_penalty"}))
    for folder, lookup in ((tiny_model_dir, 10), (tiny_base_model_dir, None)):
        _, tok = load(folder)
        generation = _with_model_defaults(settings, folder, tok).generation
        assert generation.prompt_lookup_num_tokens == lookup
        assert generation.repetition_penalty is None  # the operator's choice (unset) stands


def test_logprobs_match_float64_reference(client, loaded):
    _, tok = loaded
    weights = random_weights(tiny_config(vocab_size=tok.vocab_size), seed=0)
    ids = build_prompt(tok, "hi")
    r = client.chat.completions.create(
        model="x", messages=HI, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        lp = log_softmax(forward(weights, ids, head_dim=16)[-1])
        token = int(np.argmax(lp))  # greedy
        assert entry.logprob == pytest.approx(lp[token], abs=1e-3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            np.sort(lp)[::-1][:3], abs=1e-3
        )
        assert entry.top_logprobs[0].token == entry.token
        ids = [*ids, token]
    legacy = client.completions.create(model="x", prompt="Once", max_tokens=3, logprobs=2)
    lps = legacy.choices[0].logprobs
    assert len(lps.tokens) == len(lps.token_logprobs) == len(lps.top_logprobs) == 3
    assert all(len(top) <= 2 for top in lps.top_logprobs)
    assert lps.text_offset[0] == 0


def test_continued_conversation_reuses_the_prompt_cache(client, loaded, caplog):
    model, tok = loaded
    first = client.chat.completions.create(model="x", messages=HI, max_tokens=8)
    reply = first.choices[0].message.content
    conversation = [*HI, {"role": "assistant", "content": reply}, {"role": "user", "content": "ok"}]
    ids = tok.encode_chat(conversation)
    want = generate(model, tok, ids, max_tokens=8)
    before = client.models.list().data[0].prompt_cache
    with caplog.at_level(logging.INFO, logger="mlx_openelm.server"):
        r = client.chat.completions.create(model="x", messages=conversation, max_tokens=8)
    assert r.choices[0].message.content == want  # the cache never changes the answer
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert len(build_prompt(tok, "hi")) <= cached < len(ids)
    after = client.models.list().data[0].prompt_cache
    assert after["hits"] == before["hits"] + 1
    assert after["reused_tokens"] == before["reused_tokens"] + cached
    assert f"prompt={len(ids)} (cached {cached}) completion=8" in caplog.text


def test_models_and_health(client, url):
    (model,) = client.models.list().data
    assert model.id == "tiny-instruct" and model.owned_by == "mlx-openelm"
    assert model.context_length == 2048
    status, health = _raw(url, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny-instruct"


def test_one_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="mlx_openelm.server"):
        client.chat.completions.create(model="x", messages=HI, max_tokens=5)
        client.models.list()
    lines = [r.getMessage() for r in caplog.records if r.name == "mlx_openelm.server"]
    assert len(lines) == 2
    assert re.fullmatch(
        r"POST /v1/chat/completions 200 prompt=\d+ \(cached \d+\) completion=5 \d+\.\d{3}s",
        lines[0],
    )
    assert re.fullmatch(r"GET /v1/models 200 \d+\.\d{3}s", lines[1])


# --- Bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": HI, "max_tokens": -5}, "max_tokens", "between 1 and 2147483647, got -5"),
        ({"messages": HI, "max_tokens": "many"}, "max_tokens", "integer"),
        ({"messages": HI, "temperature": -0.5}, "temperature", ">= 0, got -0.5"),
        ({"messages": HI, "top_p": 0}, "top_p", "(0, 1]"),
        ({"messages": HI, "repetition_penalty": 0}, "repetition_penalty", "> 0"),
        ({"messages": HI, "stop": [""]}, "stop", "non-empty"),
        ({"messages": HI, "n": 3}, "n", "= 1"),
        ({"messages": HI, "stream": "yes"}, "stream", "true or false"),
        ({"messages": HI, "logprobs": True, "top_logprobs": 50}, "top_logprobs", "20"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"max_tokens": 3}, "messages", "non-empty list"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content", "string"),
        # every field range- and type-checked (these were HTTP 500s)
        ({"messages": HI, "seed": -1}, "seed", "from 0 to"),
        ({"messages": HI, "seed": 2**70}, "seed", "from 0 to"),
        ({"messages": HI, "top_k": 2**40}, "top_k", "from 0 to"),
        ({"messages": HI, "temperature": "hot"}, "temperature", "number"),
        ({"messages": HI, "max_tokens": 2**70}, "max_tokens", "between 1 and"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", "lone"),
        ({"messages": HI, "stop": ["a", "\udfff"]}, "stop[1]", "surrogate"),
        ({"messages": HI, "logit_bias": {"999999": 5}}, "logit_bias", "outside the vocabulary"),
        ({"messages": HI, "logit_bias": {"x": 5}}, "logit_bias", "token ids"),
        ({"messages": HI, "logit_bias": {"5": 500}}, "logit_bias", "[-100, 100]"),
        ({"messages": HI, "presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
        ({"messages": HI, "frequency_penalty": "x"}, "frequency_penalty", "number"),
        ({"messages": HI, "prompt_lookup_num_tokens": -1}, "prompt_lookup_num_tokens", "to 64"),
        ({"messages": HI, "prompt_lookup_min_ngram": 9}, "prompt_lookup_min_ngram", "from 1 to 8"),
        (
            {"messages": HI, "prompt_lookup_min_ngram": 5},
            "prompt_lookup_min_ngram",
            "at most `prompt_lookup_max_ngram` (4)",
        ),
        ({"messages": HI, "repetition_scope": "all"}, "repetition_scope", "'context' or"),
    ],
)
def test_invalid_values_are_400_naming_the_field(url, body, param, words):
    status, error = _raw(url, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400
    assert error["error"]["param"] == param and error["error"]["type"] == "invalid_request_error"
    assert f"`{param}`" in error["error"]["message"] and words in error["error"]["message"]


def test_openai_client_sees_bad_request_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=HI, max_tokens=-1)
    assert e.value.param == "max_tokens" and "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt="hi", temperature=-1)
    assert e.value.param == "temperature"


def test_malformed_json_and_non_objects_are_400(url):
    for raw in (b"{bad json", b"", b"[1, 2]", b'"text"', b"\xff\xfe\x00", b"[" * 100_000):
        status, error = _raw(url, "POST", "/v1/chat/completions", raw)
        assert status == 400, raw[:20]
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert "JSON" in error["error"]["message"]


def test_slow_headers_are_dropped_and_a_slow_body_is_408(url, monkeypatch):
    from mlx_openelm.serve import http as server_http

    monkeypatch.setattr(server_http, "HEADER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(server_http, "BODY_TIMEOUT_S", 0.5)
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never end
        tic = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - tic < 5
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(head + b'{"prompt": ')  # 11 of the 100 bytes, then nothing
        reply = b""
        while b"}}" not in reply and (chunk := sock.recv(4096)):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply


def test_oversized_body_is_413(url):
    status, error = _raw(url, "POST", "/v1/completions", b" " * (5 * 2**20))
    assert status == 413 and "4 MiB" in error["error"]["message"]


def test_text_parts_and_developer_role(client, loaded):
    model, tok = loaded
    messages = [{"role": "system", "content": "Be brief."}, *HI]
    want = generate(model, tok, tok.encode_chat(messages), max_tokens=5)
    r = client.chat.completions.create(
        model="x",
        max_tokens=5,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}],
            },
        ],
    )
    assert r.choices[0].message.content == want


def test_unknown_fields_are_ignored(client, loaded):
    model, tok = loaded
    want = generate(model, tok, build_prompt(tok, "hi"), max_tokens=4)
    r = client.chat.completions.create(
        model="gpt-4o",
        messages=HI,
        max_tokens=4,
        presence_penalty=0.5,
        user="someone",
        extra_body={"no_such_field": {"a": [1, 2]}, "another": None},
    )
    assert r.choices[0].message.content == want


@pytest.fixture(scope="module")
def short_context_url(tmp_path_factory, tiny_spm) -> Iterator[str]:
    """A server whose model has a 64-token context."""
    folder = make_model_dir(tmp_path_factory.mktemp("short") / "m", tiny_spm, max_context_length=64)
    model, tok = load(folder)
    with BackgroundServer(create_app(model, tok, "short")) as base_url:
        yield base_url


def test_prompt_longer_than_the_context_is_400_saying_how_long(short_context_url):
    client = _client(short_context_url)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="x", prompt=[1] + [5] * 70, max_tokens=5)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    assert "the prompt is 71 tokens long" in e.value.message and "64 tokens" in e.value.message
    long_chat = [{"role": "user", "content": "hello world " * 40}]
    status, error = _raw(
        short_context_url,
        "POST",
        "/v1/chat/completions",
        json.dumps({"messages": long_chat}).encode(),
    )
    assert status == 400 and error["error"]["param"] == "messages"
    assert re.search(r"the prompt is \d+ tokens long", error["error"]["message"])


def test_max_tokens_is_capped_at_the_context(short_context_url):
    r = _client(short_context_url).completions.create(
        model="x", prompt=[1] + [5] * 59, max_tokens=100
    )
    assert r.usage.completion_tokens == 4
    assert r.choices[0].finish_reason == "length"


def test_unknown_paths_and_methods(url, client):
    status, error = _raw(url, "GET", "/v1/nothing-here")
    assert status == 404 and "/v1/chat/completions" in error["error"]["message"]
    status, error = _raw(url, "GET", "/v1/chat/completions")
    assert status == 405 and "error" in error
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="x", input="hi")


def test_a_burst_of_bad_requests_then_a_good_one(url, client, loaded):
    model, tok = loaded
    bad: list[tuple[str, str, bytes | None]] = [
        ("POST", "/v1/chat/completions", b"{"),
        ("POST", "/v1/chat/completions", b"null"),
        ("POST", "/v1/completions", json.dumps({"prompt": [-1]}).encode()),
        ("POST", "/v1/completions", json.dumps({"prompt": [10**9]}).encode()),
        ("POST", "/v1/completions", json.dumps({"prompt": ""}).encode()),
        ("POST", "/v1/completions", json.dumps({"prompt": "x", "echo": True}).encode()),
        ("POST", "/v1/chat/completions", json.dumps({"messages": "hi"}).encode()),
        ("POST", "/v1/chat/completions", json.dumps({"messages": HI, "seed": 1.5}).encode()),
        ("POST", "/v1/chat/completions", b"[" * 50_000 + b"]" * 50_000),
        ("PUT", "/v1/models", b"x"),
        ("GET", "/../../etc/passwd", None),
    ]
    for i in range(40):
        method, path, body = bad[i % len(bad)]
        status, _ = _raw(url, method, path, body)
        assert 400 <= status < 500, (method, path, body and body[:30])
    parts = urlsplit(url)
    for junk in (b"\x16\x03\x01garbage\r\n\r\n", b"NOT HTTP AT ALL\r\n\r\n"):
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
            s.sendall(junk)
            s.recv(1024)  # uvicorn answers 400 or closes; either way it keeps serving
    want = generate(model, tok, build_prompt(tok, "hi"), max_tokens=6)
    r = client.chat.completions.create(model="x", messages=HI, max_tokens=6)
    assert r.choices[0].message.content == want


# --- Disconnects, overload, auth ----------------------------------------------------------


def test_client_disconnect_stops_generation(client, url, caplog):
    before = _wait_idle(url)["requests"]
    with caplog.at_level(logging.INFO, logger="mlx_openelm.server"):
        stream = client.completions.create(model="x", prompt="Once", max_tokens=LONG, stream=True)
        for _, _chunk in zip(range(3), stream):
            pass
        stream.close()  # hang up mid-stream
        after = _wait_idle(url)["requests"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]
    assert after["generated_tokens"] - before["generated_tokens"] < LONG // 2
    assert "client-disconnected" in caplog.text
    r = client.completions.create(model="x", prompt="Once", max_tokens=3)  # still serving
    assert r.usage.completion_tokens == 3


def test_client_giving_up_on_a_non_streaming_request_stops_generation(url):
    before = _wait_idle(url)["requests"]
    impatient = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="x", prompt="Once", max_tokens=LONG)
    after = _wait_idle(url)["requests"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < LONG // 2


def test_queue_full_is_429_and_the_server_recovers(loaded):
    model, tok = loaded
    app = create_app(model, tok, "tiny", ServerSettings(max_queue=0, max_batch=1))
    with BackgroundServer(app) as base_url:
        client = _client(base_url)
        stream = client.completions.create(model="x", prompt="Once", max_tokens=LONG, stream=True)
        next(iter(stream))  # the long generation is running
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="x", prompt="Once", max_tokens=2)
        assert e.value.code == "queue_full"
        stream.close()
        _wait_idle(base_url)
        r = client.completions.create(model="x", prompt="Once", max_tokens=2)
        assert r.usage.completion_tokens == 2


def test_api_key_is_required_when_set(loaded):
    model, tok = loaded
    app = create_app(model, tok, "tiny", ServerSettings(api_key="s3cret"))
    with BackgroundServer(app) as base_url:
        with pytest.raises(openai.AuthenticationError) as e:
            _client(base_url, api_key="wrong").models.list()
        assert e.value.code == "invalid_api_key"
        status, error = _raw(base_url, "POST", "/v1/chat/completions", b"{}")
        assert status == 401 and "Bearer" in error["error"]["message"]
        assert _raw(base_url, "GET", "/health")[0] == 200  # health checks need no key
        good = _client(base_url, api_key="s3cret")
        r = good.chat.completions.create(model="x", messages=HI, max_tokens=2)
        assert r.usage.completion_tokens == 2


def test_base_model_chat_is_400_pointing_to_completions(tiny_base_model_dir):
    model, tok = load(tiny_base_model_dir)
    with BackgroundServer(create_app(model, tok, "tiny-base")) as base_url:
        client = _client(base_url)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="x", messages=HI, max_tokens=2)
        assert "/v1/completions" in e.value.message
        r = client.completions.create(model="x", prompt="Once", max_tokens=2)
        assert r.usage.completion_tokens == 2


# --- The CLI -----------------------------------------------------------------------------


def test_cli_serve_end_to_end(tiny_model_dir):
    """`mlx-openelm serve` in a subprocess on a free port: startup line, a request, Ctrl-C."""
    cmd = [sys.executable, "-m", "mlx_openelm.cli", "serve", "-m", str(tiny_model_dir)]
    proc = popen_interruptible(
        [*cmd, "--port", "0", "--max-tokens", "3"], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline, line = time.monotonic() + 60, ""
        while "Serving" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = proc.stderr.readline()
        base_url = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line).group(1)
        assert re.search(rf"Serving {tiny_model_dir.name} at", line)
        r = _client(base_url).chat.completions.create(model="x", messages=HI)
        assert r.usage.completion_tokens == 3  # --max-tokens is the default for requests
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "POST /v1/chat/completions 200 prompt=" in rest


def test_cli_serve_errors_are_one_line(tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from mlx_openelm.cli import app

    runner = CliRunner()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        res = runner.invoke(app, ["serve", "-m", str(tiny_model_dir), "--port", str(port)])
    assert res.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in res.output
    res = runner.invoke(app, ["serve", "-m", str(tiny_model_dir), "--max-tokens", "-2"])
    assert res.exit_code == 1 and "max_tokens" in res.output
    res = runner.invoke(app, ["serve", "-m", str(tiny_model_dir), "--max-queue", "-1"])
    assert res.exit_code == 1 and "--max-queue" in res.output
    # Without the [serve] extra: one line saying how to install it.
    for name in ("mlx_openelm.server", "mlx_openelm.serve.app", "mlx_openelm.serve.http"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ServeError, match=re.escape('pip install -e ".[serve]"')):
        importlib.import_module("mlx_openelm.server")
    res = runner.invoke(app, ["serve", "-m", str(tiny_model_dir)])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "needs the server extra (uvicorn is not installed): pip install -e" in res.output
