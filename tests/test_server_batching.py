"""The server decoding many requests together: continuous batching, the LRU of prompt caches,
``--prompt-cache-file``, CORS and ``/v1/models``.

Real servers on loopback serving the tiny random model, driven by the official ``openai``
client from threads; every batched reply is checked against ``mlx_openelm.generate`` on the
same request alone.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import mlx.core as mx
import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the server tests need the dev extra (openai)")
pytest.importorskip(
    "starlette", reason='the server needs the serve extra: pip install -e ".[serve]"'
)

from conftest import make_model_dir  # noqa: E402
from test_server import _client  # noqa: E402

from mlx_openelm.errors import ServeError  # noqa: E402
from mlx_openelm.generate import build_prompt, generate  # noqa: E402
from mlx_openelm.loading import load  # noqa: E402
from mlx_openelm.prompt_cache import PrefixCache, cache_nbytes, prefill, system_prefix  # noqa: E402
from mlx_openelm.server import BackgroundServer, ServerSettings, create_app  # noqa: E402

LONG = 1500  # tokens: a stream that is still running when the test acts on it


def _raw(base_url: str, method: str, path: str, headers: dict[str, str] | None = None,
         body: Any = None) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw or "null")


def _health(base_url: str, idle: bool = False) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        _, _, health = _raw(base_url, "GET", "/health")
        if not idle or (not health["busy"] and health["pending"] == 0):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.02)


@pytest.fixture(scope="module")
def url(loaded) -> Iterator[str]:
    model, tok = loaded
    app = create_app(model, tok, "tiny", ServerSettings(max_batch=4, max_queue=8))
    with BackgroundServer(app) as base_url:
        yield base_url


def _chat(client: openai.OpenAI, text: str, stream: bool, **kw: Any) -> str:
    messages = [{"role": "user", "content": text}]
    r = client.chat.completions.create(model="x", messages=messages, stream=stream, **kw)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    return r.choices[0].message.content


# --- Batching -------------------------------------------------------------------------------

REQUESTS = [  # (prompt, max_tokens, extra options): different lengths join and leave
    ("hi", 40, {}),
    ("Tell me a story about a cat", 25, {}),
    ("a", 60, {"extra_body": {"repetition_penalty": 1.3, "repetition_scope": "context"}}),
    ("what is two plus two", 33, {"presence_penalty": 0.5, "frequency_penalty": 0.3}),
    ("Once upon a time", 50, {}),
    ("b c d", 20, {"temperature": 5.0, "seed": 7}),  # runs alone, still the seed's reply
]


def test_concurrent_requests_get_the_reply_each_gets_alone(url, loaded):
    model, tok = loaded
    want = []
    for text, n, kw in REQUESTS:
        options = {**kw.get("extra_body", {}), **{k: v for k, v in kw.items() if k != "extra_body"}}
        if "temperature" in options:
            options["temp"] = options.pop("temperature")
        want.append(generate(model, tok, build_prompt(tok, text), max_tokens=n, **options))
    client = _client(url)
    before = _health(url, idle=True)["requests"]
    # A long stream is decoding when the others arrive: they join its batch (the seeded one
    # waits for the batch to drain, this stream included, then runs alone).
    stream = client.completions.create(model="x", prompt="Once", max_tokens=300, stream=True)
    next(iter(stream))
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        futures = [
            pool.submit(_chat, client, text, i % 2 == 0, max_tokens=n, **kw)
            for i, (text, n, kw) in enumerate(REQUESTS)
        ]
        got = [f.result(timeout=120) for f in futures]
    stream.close()
    assert got == want
    after = _health(url, idle=True)["requests"]
    assert after["solo"] == before["solo"] + 1  # the seeded one
    assert 2 <= after["peak_batch"] <= 4  # --max-batch 4 bounds the batch
    assert after["completed"] - before["completed"] == len(REQUESTS) + 1


def test_a_client_hanging_up_leaves_the_batch_and_the_others_finish(url, loaded):
    model, tok = loaded
    want = generate(model, tok, build_prompt(tok, "hi"), max_tokens=80)
    client = _client(url)
    before = _health(url, idle=True)["requests"]
    quitter = client.completions.create(model="x", prompt="Once", max_tokens=LONG, stream=True)
    next(iter(quitter))
    with ThreadPoolExecutor(1) as pool:
        stayer = pool.submit(_chat, client, "hi", True, max_tokens=80)
        for _, _chunk in zip(range(5), quitter):
            pass
        quitter.close()  # hang up mid-stream, while the other one decodes beside it
        assert stayer.result(timeout=60) == want
    after = _health(url, idle=True)["requests"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < LONG // 2


def test_max_batch_bounds_the_batch_and_a_full_queue_is_429(loaded):
    model, tok = loaded
    app = create_app(model, tok, "tiny", ServerSettings(max_batch=2, max_queue=1))
    with BackgroundServer(app) as base_url:
        client = _client(base_url)
        streams = [
            client.completions.create(model="x", prompt=p, max_tokens=LONG, stream=True)
            for p in ("Once", "Twice")
        ]
        for s in streams:
            next(iter(s))
        with ThreadPoolExecutor(1) as pool:
            waiter = pool.submit(client.completions.create, model="x", prompt="a", max_tokens=3)
            deadline = time.monotonic() + 20
            while _health(base_url)["pending"] < 3:  # the third waits for room
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model="x", prompt="b", max_tokens=2)
            assert e.value.code == "queue_full"
            start = _health(base_url)["requests"]["generated_tokens"]
            while _health(base_url)["requests"]["generated_tokens"] < start + 40:
                time.sleep(0.01)  # the two streams decode on ...
            assert not waiter.done()  # ... while the third still waits for room
            assert _health(base_url)["requests"]["peak_batch"] == 2
            for s in streams:
                s.close()
            assert waiter.result(timeout=60).usage.completion_tokens == 3
        health = _health(base_url, idle=True)
        assert health["requests"]["peak_batch"] == 2 and health["max_batch"] == 2


def test_batch_generator_with_our_model_gives_each_prompt_its_tokens_alone(loaded):
    """mlx-lm's BatchGenerator on OpenELM (each layer its own KV head count): prompts of
    different lengths, some with cached prefixes of different lengths, joining at different
    steps, decode to the tokens stream_generate gives each alone (padding masked, RoPE offset
    per row)."""
    from mlx_lm.generate import BatchGenerator

    from mlx_openelm.generate import stream_generate

    model, tok = loaded
    prompts = [tok.encode(t) for t in ("hi", "a much longer prompt than the others", "b c", "x")]
    want = [[r.token for r in stream_generate(model, tok, p, max_tokens=12)] for p in prompts]
    gen = BatchGenerator(model, stop_tokens=[[tok.eos_token_id]])
    got: dict[int, list[int]] = {}
    uids = gen.insert(prompts[:2], max_tokens=[12, 12])
    for step in range(80):
        if step == 3:  # these join a running batch, from cached prefixes of 4 and 1 tokens
            cached = [(prompts[1][:4], prompts[1]), (prompts[2][:1], prompts[2])]
            caches = [prefill(model, head) for head, _ in cached]
            uids += gen.insert(
                [p[len(head) :] for head, p in cached],
                max_tokens=[12, 12],
                caches=caches,
                all_tokens=[head for head, _ in cached],
            )
        for r in gen.next_generated():
            got.setdefault(r.uid, []).append(r.token)
    assert [got[u] for u in uids] == [want[0], want[1], want[1], want[2]]


def test_a_waiting_client_that_gives_up_frees_its_place_at_once(loaded):
    model, tok = loaded
    app = create_app(model, tok, "tiny", ServerSettings(max_batch=1, max_queue=1))
    with BackgroundServer(app) as base_url:
        client = _client(base_url)
        stream = client.completions.create(model="x", prompt="Once", max_tokens=LONG, stream=True)
        next(iter(stream))
        impatient = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=0.3)
        with pytest.raises(openai.APITimeoutError):  # it waited behind the stream, then left
            impatient.completions.create(model="x", prompt="a", max_tokens=3)
        deadline = time.monotonic() + 20
        while (health := _health(base_url))["pending"] > 1 and not health["requests"]["completed"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # dropped while the stream still fills the batch, not once the stream has finished
        assert health["pending"] == 1 and health["requests"]["completed"] == 0
        assert health["requests"]["cancelled"] == 1
        stream.close()


def test_a_job_the_batch_refuses_fails_alone_and_frees_its_place(loaded):
    """A job mlx-lm's BatchGenerator refuses at insert (here an empty prompt, which the HTTP
    layer never sends) gets a Failed event, leaves the engine's count and harms no one else:
    before, it was lost between the queue and the batch and its client waited forever."""
    import queue

    from mlx_openelm.generate import GenerationOptions
    from mlx_openelm.serve.engine import Engine
    from mlx_openelm.serve.sequence import Failed, Finished, Job

    model, tok = loaded
    engine = Engine(model, tok, max_queue=0, max_batch=2)
    engine.start()
    try:
        events = {name: queue.Queue() for name in ("ok", "bad")}
        ok = Job(ids=tok.encode("Once upon"), options=GenerationOptions(max_tokens=40),
                 sink=events["ok"].put)  # fmt: skip
        engine.submit(ok)
        while not engine.busy:
            time.sleep(0.005)
        engine.submit(Job(ids=[], options=GenerationOptions(max_tokens=3), sink=events["bad"].put))
        bad = events["bad"].get(timeout=20)
        assert isinstance(bad, Failed) and "empty prompt" in str(bad.error)
        last = None
        while not isinstance(last, (Finished, Failed)):
            last = events["ok"].get(timeout=60)
        assert isinstance(last, Finished) and last.completion_tokens == 40  # it kept decoding
        _wait_until_idle(engine)
    finally:
        engine.stop()


def _wait_until_idle(engine) -> None:
    deadline = time.monotonic() + 20
    while engine.pending:
        assert time.monotonic() < deadline, engine.pending
        time.sleep(0.005)


def _engine_run(engine, jobs_and_events, timeout: float = 60) -> dict[str, list]:
    """Every event each job's sink received, once all of them have finished."""
    from mlx_openelm.serve.sequence import Failed, Finished

    out = {}
    for name, events in jobs_and_events.items():
        got = []
        while not got or not isinstance(got[-1], (Finished, Failed)):
            got.append(events.get(timeout=timeout))
        out[name] = got
    return out


def test_lookup_runs_alone_on_an_idle_engine_and_hands_off_when_another_arrives(loaded):
    """One lookup request on an idle engine decodes with lookup; a request arriving after its
    third token makes it go on in the batch (same Sequence: text, counts), the newcomer joins
    at once, a lookup request arriving then decodes plainly, and every reply is generate's."""
    import queue

    from mlx_openelm.generate import GenerationOptions, stream_generate
    from mlx_openelm.serve.engine import Engine
    from mlx_openelm.serve.sequence import Finished, Job, Piece

    model, tok = loaded
    engine = Engine(model, tok, max_queue=4, max_batch=4)
    engine.start()
    prompts = {"solo": "a b c a b c a b", "first": "Once upon a time, once upon",
               "newcomer": "hi", "late": "x y z x y"}  # fmt: skip
    n = {"solo": 40, "first": 48, "newcomer": 12, "late": 16}
    lookup = GenerationOptions(prompt_lookup_num_tokens=5)
    ids = {k: tok.encode(v) for k, v in prompts.items()}
    want = {k: [r.token for r in stream_generate(model, tok, ids[k], max_tokens=n[k])] for k in ids}
    events = {k: queue.Queue() for k in ids}

    def job(name, options):
        return Job(ids=ids[name], options=options.replace(max_tokens=n[name]),
                   sink=events[name].put)  # fmt: skip

    try:
        engine.submit(job("solo", lookup))  # alone from start to end
        solo = _engine_run(engine, {"solo": events["solo"]})["solo"]
        assert (engine.stats.lookup, engine.stats.handed_off) == (1, 0)
        assert engine.stats.lookup_proposed > 0 and engine.stats.lookup_accepted > 0
        stop = tok.decode(want["solo"])[12:15]  # the Sequence cuts at a stop string here too
        engine.submit(Job(ids=ids["solo"], options=lookup.replace(max_tokens=40, stop=(stop,)),
                          sink=events["solo"].put))  # fmt: skip
        cut = _engine_run(engine, {"solo": events["solo"]})["solo"]
        text = "".join(e.text for e in cut if isinstance(e, Piece))
        assert text == generate(model, tok, ids["solo"], max_tokens=40, stop=[stop])
        assert stop not in text and cut[-1].finish_reason == "stop"
        pieces = [0]

        def first_sink(event):
            events["first"].put(event)
            pieces[0] += isinstance(event, Piece)
            if pieces[0] == 3:  # the engine thread is inside the lookup loop: arrive now
                engine.submit(job("newcomer", GenerationOptions()))
                engine.submit(job("late", lookup))

        engine.submit(Job(ids=ids["first"], options=lookup.replace(max_tokens=n["first"]),
                          sink=first_sink))  # fmt: skip
        got = {"solo": solo, **_engine_run(engine, {k: events[k] for k in n if k != "solo"})}
        assert (engine.stats.lookup, engine.stats.handed_off) == (3, 1)  # "late" ran plainly
        taken = engine.prefix_cache.stats.hits + engine.prefix_cache.stats.misses
        assert taken == 5  # one cache per job: the handed-off job brought its own along
        assert engine.stats.peak_batch >= 2
        for name, evs in got.items():
            text = "".join(e.text for e in evs if isinstance(e, Piece))
            assert text == tok.decode(want[name]), name
            end = evs[-1]
            assert isinstance(end, Finished), (name, end)
            assert (end.prompt_tokens, end.completion_tokens) == (len(ids[name]), n[name]), name
            assert end.finish_reason == "length"
        _wait_until_idle(engine)
    finally:
        engine.stop()


def test_n_above_one_is_400_and_the_batch_keeps_serving(url):
    client = _client(url)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "a"}], n=2)
    assert e.value.body["param"] == "n"
    assert (
        client.completions.create(model="x", prompt="a", max_tokens=2).usage.completion_tokens == 2
    )


# --- Many cached conversations --------------------------------------------------------------


def _turns(client: openai.OpenAI, opener: str) -> Iterator[int]:
    """A conversation, one turn per next(): yields each turn's cached_tokens."""
    messages = [{"role": "user", "content": opener}]
    while True:
        r = client.chat.completions.create(model="x", messages=messages, max_tokens=6)
        yield r.usage.prompt_tokens_details.cached_tokens
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": "go on"}]  # fmt: skip


def test_two_alternating_conversations_both_keep_their_cache_hits(url, loaded):
    client = _client(url)
    a, b = _turns(client, "Tell me about cats"), _turns(client, "Write about the sea")
    _, tok = loaded
    openers = {a: "Tell me about cats", b: "Write about the sea"}
    for conv, opener in openers.items():  # only the chat template's header is shared
        assert next(conv) < len(build_prompt(tok, opener))
    for _ in range(2):
        # one cached prefix would be evicted by the other conversation's turn
        for conv, opener in openers.items():
            assert next(conv) >= len(build_prompt(tok, opener))


def test_prefix_cache_evicts_the_least_recently_used_past_its_bytes(loaded):
    model, tok = loaded
    a, b, c = (list(range(start, start + 20)) for start in (10, 40, 70))  # nothing shared
    size = cache_nbytes(prefill(model, a))
    cache = PrefixCache(model, max_bytes=2 * size + size // 2)  # room for two of them
    for ids in (a, b):
        cache.put(prefill(model, ids), ids)
    _, reused = cache.take([*a, 5])  # touching a makes b the least recently used
    assert reused == len(a)
    cache.put(prefill(model, c), c)
    assert cache.entries == [a, c] and cache.stats.evicted == 1
    assert cache.take([*b, 5])[1] == 0 and cache.take([*c, 5])[1] == len(c)
    assert cache.stats.bytes <= cache.max_bytes
    longer = [*a, 7, 8]  # a's continuation replaces it: one entry serves both
    cache.put(prefill(model, longer), longer)
    assert cache.entries == [c, longer]


def test_a_taken_prefix_stays_unchanged_for_the_next_request(loaded):
    model, tok = loaded
    ids = build_prompt(tok, "shared system prompt")
    cache = PrefixCache(model)
    kept = prefill(model, ids)
    keys = [np.array(c.keys[..., : len(ids), :]) for c in kept]
    cache.put(kept, ids)
    first, n = cache.take([*ids[:-2], 9, 9])  # cut back and extended by one request
    model(mx.array([[9, 9, 9]]), cache=first)
    second, m = cache.take([*ids, 3])
    assert (n, m) == (len(ids) - 2, len(ids))
    assert second[0].offset == len(ids) and cache.entries == [ids]
    for c, k in zip(second, keys):
        np.testing.assert_array_equal(np.array(c.keys[..., : len(ids), :]), k)


# --- --prompt-cache-file ---------------------------------------------------------------------

SYSTEM = "You are a pirate who answers every question in rhyme, briefly and kindly."


def _system_chat(client: openai.OpenAI, question: str) -> Any:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return client.chat.completions.create(model="x", messages=messages, max_tokens=8)


def test_prompt_cache_file_round_trip_across_two_server_starts(loaded, tmp_path):
    model, tok = loaded
    path = tmp_path / "system.safetensors"
    ids = tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q"}])
    want = generate(model, tok, ids, max_tokens=8)
    prefix = system_prefix(tok, SYSTEM)
    assert ids[: len(prefix)] == prefix and len(prefix) > 10
    settings = ServerSettings(prompt_cache_file=str(path), cache_system_prompt=SYSTEM)
    for start in range(2):  # built and saved, then loaded
        with BackgroundServer(create_app(model, tok, "tiny", settings)) as base_url:
            r = _system_chat(_client(base_url), "q")
        assert path.exists() and r.choices[0].message.content == want
        cached = r.usage.prompt_tokens_details.cached_tokens
        assert len(prefix) <= cached < len(ids), start  # the first request of each start
        settings = ServerSettings(prompt_cache_file=str(path))  # no prompt: the file has it


def test_prompt_cache_file_errors(loaded, tmp_path, tiny_spm):
    model, tok = loaded
    with pytest.raises(ServeError, match="does not exist; pass --cache-system-prompt"):
        create_app(model, tok, "t", ServerSettings(prompt_cache_file=str(tmp_path / "no")))
    other = make_model_dir(tmp_path / "other", tiny_spm, num_transformer_layers=2)
    other_model, _ = load(other)
    path = tmp_path / "other.safetensors"
    settings = ServerSettings(prompt_cache_file=str(path), cache_system_prompt=SYSTEM)
    create_app(other_model, tok, "other", settings)  # built for the 2-layer model
    with pytest.raises(ServeError, match="was made with another model"):
        create_app(model, tok, "tiny", settings)
    (tmp_path / "junk").write_text("not a cache")
    with pytest.raises(ServeError, match="is not a prompt cache file"):
        create_app(model, tok, "t", ServerSettings(prompt_cache_file=str(tmp_path / "junk")))
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    cache, meta = load_prompt_cache(str(path), return_metadata=True)
    for tokens, message in (("[1, 2", "malformed JSON"), ('["a"]', "holds non-integers")):
        damaged = tmp_path / "damaged.safetensors"
        save_prompt_cache(str(damaged), cache, {**meta, "tokens": tokens})
        with pytest.raises(ServeError, match=message):
            create_app(other_model, tok, "t", ServerSettings(prompt_cache_file=str(damaged)))


def test_cli_prompt_cache_file_from_another_model_is_one_line(tiny_model_dir, tmp_path, tiny_spm):
    from typer.testing import CliRunner

    from mlx_openelm.cli import app

    other = make_model_dir(tmp_path / "other", tiny_spm, num_transformer_layers=2)
    path = tmp_path / "c.safetensors"
    other_model, tok = load(other)
    create_app(other_model, tok, "o", ServerSettings(prompt_cache_file=str(path),
                                                     cache_system_prompt=SYSTEM))  # fmt: skip
    args = ["serve", "-m", str(tiny_model_dir), "--port", "0", "--prompt-cache-file", str(path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "was made with another model" in res.output


# --- CORS and /v1/models --------------------------------------------------------------------


def test_cors_allowed_forbidden_and_preflight(loaded):
    model, tok = loaded
    ok, bad = "http://app.example", "http://evil.example"
    settings = ServerSettings(allowed_origins=(ok,), api_key="k", adapter="my-lora")
    with BackgroundServer(create_app(model, tok, "tiny", settings)) as base_url:
        auth = {"Authorization": "Bearer k"}
        status, headers, body = _raw(base_url, "GET", "/v1/models", {**auth, "Origin": ok})
        assert status == 200 and headers["access-control-allow-origin"] == ok
        assert body["data"][0]["id"] == "tiny" and body["data"][0]["adapters"] == ["my-lora"]
        status, headers, body = _raw(base_url, "GET", "/v1/models", {**auth, "Origin": bad})
        assert status == 403 and "access-control-allow-origin" not in headers
        assert body["error"]["param"] == "Origin" and bad in body["error"]["message"]
        ask = {"Origin": ok, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
        status, headers, _ = _raw(base_url, "OPTIONS", "/v1/chat/completions", ask)
        assert status == 204 and headers["access-control-allow-origin"] == ok  # before auth
        assert "POST" in headers["access-control-allow-methods"]
        assert headers["access-control-allow-headers"] == "authorization, content-type"
        body = {"prompt": "a", "max_tokens": 2}
        status, headers, r = _raw(base_url, "POST", "/v1/completions", {**auth, "Origin": ok}, body)
        assert status == 200 and r["usage"]["completion_tokens"] == 2
        assert headers["access-control-allow-origin"] == ok
        status, _, _ = _raw(base_url, "GET", "/v1/models", auth)  # no Origin: not a browser
        assert status == 200
    for origins, want in (((), 403), (("*",), 200)):  # none by default; "*" allows any
        app = create_app(model, tok, "tiny", ServerSettings(allowed_origins=origins))
        with BackgroundServer(app) as base_url:
            assert _raw(base_url, "GET", "/v1/models", {"Origin": bad})[0] == want


def test_models_list_no_adapters_by_default(url):
    (model,) = _client(url).models.list().data
    assert model.id == "tiny" and model.adapters == []


def test_server_keeps_serving_while_a_thread_waits(url):
    """Requests from many threads at once all come back (no deadlock in the worker)."""
    client = _client(url)
    done = []

    def one(i: int) -> None:
        done.append(client.completions.create(model="x", prompt=f"x{i}", max_tokens=3))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(done) == 10 and all(r.usage.completion_tokens == 3 for r in done)
