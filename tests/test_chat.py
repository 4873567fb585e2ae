"""Chat: the real CLI driven through stdin, KV-cache reuse counted in prefilled tokens per turn,
token-faithful history after EOS, context trimming, transcripts, Ctrl-C, and bad input."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_model_dir
from typer.testing import CliRunner

import mlx_openelm
from mlx_openelm.chat import ChatSession
from mlx_openelm.chat_repl import run_repl
from mlx_openelm.cli import app
from mlx_openelm.errors import DataError, GenerationError

runner = CliRunner()
N = 8  # tokens per reply: tiny random models rarely stop on their own


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_spm):
    root = tmp_path_factory.mktemp("chat")
    return {
        "inst": make_model_dir(root / "inst", tiny_spm, seed=3),
        "base": make_model_dir(root / "base", tiny_spm, seed=3, instruct=False),
        "draft": make_model_dir(root / "draft", tiny_spm, seed=5, num_transformer_layers=2),
    }


@pytest.fixture(scope="module")
def inst(dirs):
    return mlx_openelm.load(dirs["inst"])


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def fresh_reply(model, tok, ids: list[int], n: int = N, **options) -> str:
    """Greedy reply computed from scratch (no cache kept between turns, no prompt lookup)."""
    return mlx_openelm.generate(model, tok, ids, n, **options)


# What `chat` gives an Instruct model unless told otherwise (it also turns prompt lookup on,
# which leaves greedy replies as they are).
APPLE = {"repetition_penalty": 1.2, "repetition_scope": "context"}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def chat_cli(folder, script: str, *args: str):
    return runner.invoke(app, ["chat", "--model", str(folder), "-n", str(N), *args], input=script)


def stats_rows(text: str) -> list[tuple[int, ...]]:
    """(turn, prompt, prefilled, generated) from the /stats table."""
    rows = re.findall(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s", text, flags=re.M)
    return [tuple(map(int, r)) for r in rows]


def test_cli_transcript(dirs, inst):
    model, tok = inst
    script = "hi\n/system be brief\nhello again\n/stats\n/reset\nhi\n/quit\n"
    result = chat_cli(dirs["inst"], script)
    assert result.exit_code == 0, result.output

    system = {"role": "system", "content": "be brief"}
    turn1 = tok.encode_chat([user("hi")])
    reply1 = fresh_reply(model, tok, turn1, **APPLE)
    turn2 = tok.encode_chat([system, user("hi"), assistant(reply1), user("hello again")])
    reply2 = fresh_reply(model, tok, turn2, **APPLE)
    reply3 = fresh_reply(model, tok, tok.encode_chat([system, user("hi")]), **APPLE)
    assert result.stdout == (
        f">>> hi\n{reply1}\n>>> /system be brief\n>>> hello again\n{reply2}\n>>> /stats\n"
        f">>> /reset\n>>> hi\n{reply3}\n>>> /quit\n"
    )
    assert "/help lists commands" in result.stderr
    assert "(system prompt set)" in result.stderr and "(conversation cleared)" in result.stderr
    # The new system prompt changes the start of the conversation, so turn 2 reuses only the
    # cached prefix the two renderings share and prefills the rest.
    cached_after_1 = turn1 + tok.encode(reply1, add_bos=False)  # the reply ran through the cache
    shared = common_prefix(turn2, turn1)
    assert stats_rows(result.stderr) == [
        (1, len(turn1), len(turn1), N),
        (2, len(turn2), len(turn2) - shared, N),
    ]
    assert 0 < shared < len(cached_after_1)


def test_cli_second_turn_prefills_only_new_tokens(dirs, inst):
    model, tok = inst
    result = chat_cli(dirs["inst"], "hi\nhello again\n/stats\n")
    assert result.exit_code == 0, result.output
    (_, p1, f1, g1), (_, p2, f2, g2) = stats_rows(result.stderr)
    assert p1 == f1 == len(tok.encode_chat([user("hi")])) and g1 == N
    # Everything up to the end of reply 1 came from the cache but its last token, which prompt
    # lookup (on by default for Instruct models) never feeds: it runs with the next turn.
    assert f2 == p2 - (p1 + g1) + 1
    # Plain greedy decoding feeds every token. Reply 1 hit the length limit (no EOS), so the
    # new text starts with the template's </s>.
    args = ("--prompt-lookup", "0", "--repetition-penalty", "1")
    plain = chat_cli(dirs["inst"], "hi\nhello again\n/stats\n", *args)
    (_, p1, f1, g1), (_, p2, f2, g2) = stats_rows(plain.stderr)
    glue = tok.encode("</s>\n<|user|>\nhello again</s>\n<|assistant|>\n", add_bos=False)
    assert f2 == p2 - (p1 + g1) == len(glue)


def test_cache_reuse_is_exact(inst):
    """Turn 2 prefills exactly the template text after reply 1 and replies as a fresh run would."""
    model, tok = inst
    session = ChatSession(model, tok, max_tokens=N, system="be brief")
    turn1 = session.send("hi")
    reply1 = "".join(r.text for r in turn1)
    generated = turn1.session.turns[-1].generated_tokens
    turn2 = session.send("hello again")
    assert turn2.reused == len(turn1.tokens) + generated == session.cached_tokens
    new_ids = turn2.tokens[turn2.reused :]
    rendered1 = tok.apply_chat_template([{"role": "system", "content": "be brief"}, user("hi")])
    assert tok.decode(new_ids, skip_special=False) == turn2.text[len(rendered1 + reply1) :]
    assert turn2.text.endswith("</s>\n<|user|>\nhello again</s>\n<|assistant|>\n")
    reply2 = "".join(r.text for r in turn2)
    assert reply2 == fresh_reply(model, tok, turn2.tokens)
    assert [t.prefilled_tokens for t in session.turns] == [len(turn1.tokens), len(new_ids)]


class Scripted(nn.Module):
    """The tiny model plus a bigram bias: after token a it (almost) always says ``chain[a]``."""

    def __init__(self, inner: nn.Module, chain: dict[int, int], vocab: int):
        super().__init__()
        self.inner = inner
        bias = np.zeros((vocab, vocab), np.float32)
        for a, b in chain.items():
            bias[a, b] = 1e4
        self.bias = mx.array(bias)
        self.calls_left: int | None = None  # raise KeyboardInterrupt when it reaches 0

    @property
    def layers(self):
        return self.inner.layers

    @property
    def args(self):
        return self.inner.args

    def __call__(self, inputs, cache=None, mask=None):
        if self.calls_left is not None:
            self.calls_left -= 1
            if self.calls_left < 0:
                self.calls_left = None  # once
                raise KeyboardInterrupt
        return self.inner(inputs, cache=cache) + self.bias[inputs]


def scripted(inst) -> tuple[Scripted, object, list[int]]:
    """A model whose reply after ``<|assistant|>\\n`` is "hello world" then EOS."""
    model, tok = inst
    reply = [*tok.encode("hello world", add_bos=False), tok.eos_id]
    newline = tok.encode_chat([user("x")])[-1]
    assert len({newline, *reply}) == len(reply) + 1  # a chain without cycles
    chain = dict(zip([newline, *reply[:-1]], reply))
    return Scripted(model, chain, tok.vocab_size), tok, reply


def test_reply_ending_in_eos_stays_token_faithful(inst):
    model, tok, reply_ids = scripted(inst)
    session = ChatSession(model, tok, max_tokens=N)
    turn1 = session.send("hi")
    assert "".join(r.text for r in turn1) == "hello world"
    assert session.turns[-1].finish_reason == "stop" and session.turns[-1].generated_tokens == len(
        reply_ids
    )
    turn2 = session.send("again")
    # The cache holds the generated ids (EOS included); only the next stretch is new. A fresh
    # encoding of the whole conversation would split "<|assistant|>\nhello" differently.
    assert turn2.tokens[: turn2.reused] == turn1.tokens + reply_ids
    suffix = "\n<|user|>\nagain</s>\n<|assistant|>\n"
    assert turn2.tokens[turn2.reused :] == tok.encode(suffix, add_bos=False)
    assert turn2.tokens != tok.encode_chat(session.messages)
    assert "".join(r.text for r in turn2) == "hello world"


def test_context_full_drops_oldest_turns(inst):
    model, tok = inst
    session = ChatSession(model, tok, max_tokens=N, system="be brief", context_length=96)
    infos: list[str] = []
    io = FakeIO([f"message number {i}" for i in range(5)], infos=infos)
    assert run_repl(session, io) == 0
    dropped = [t for t in session.turns if t.dropped_turns]
    assert dropped and all(t.prompt_tokens + N <= 96 for t in session.turns)
    assert session.messages[0] == {"role": "system", "content": "be brief"}
    assert session.messages[1] != user("message number 0")
    assert any(line.startswith("(context full: dropped the 1 oldest turn") for line in infos)
    # After the rebuild the cache still gives the reply a fresh run gives.
    last = session.messages[-1]["content"]
    assert last == fresh_reply(model, tok, tok.encode_chat(session.messages[:-1]))
    with pytest.raises(GenerationError, match="does not fit the 96-token context"):
        session.send("word " * 120)


class FakeIO:
    def __init__(self, lines, infos=None, interrupt_write_at: int | None = None):
        self.lines, self.out, self.errors = list(lines), [], []
        self.infos = [] if infos is None else infos
        self.interrupt_write_at = interrupt_write_at

    def read(self, prompt: str):
        if not self.lines:
            return None
        line = self.lines.pop(0)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    def write(self, text: str) -> None:
        if self.interrupt_write_at is not None and len(self.out) == self.interrupt_write_at:
            self.interrupt_write_at = None
            raise KeyboardInterrupt
        self.out.append(text)

    def info(self, text: str) -> None:
        self.infos.append(text)

    def error(self, text: str) -> None:
        self.errors.append(text)


@pytest.mark.parametrize("where", ["terminal", "model"])
def test_ctrl_c_stops_the_reply_and_keeps_the_session(inst, where):
    model, tok, _ = scripted(inst)
    session = ChatSession(model, tok, max_tokens=N)
    io = FakeIO(["hi", "again"], interrupt_write_at=2 if where == "terminal" else None)
    if where == "model":
        model.calls_left = 4  # the 5th forward pass (3rd token) is interrupted in mlx-lm's loop
    try:
        assert run_repl(session, io) == 0
    finally:
        model.calls_left = None
    assert "(reply stopped)" in io.infos
    first, second = session.turns
    assert first.finish_reason == "interrupted" and second.finish_reason == "stop"
    assert second.prefilled_tokens == second.prompt_tokens  # the cache was rebuilt from scratch
    assert session.messages[0] == user("hi") and session.messages[-1] == assistant("hello world")
    partial = session.messages[1]["content"]  # the stopped reply is kept as far as it got
    assert session.messages[1]["role"] == "assistant" and "hello world".startswith(partial)
    assert 0 < len(partial) < len("hello world")
    assert run_repl(session, FakeIO([KeyboardInterrupt, "never read"])) == 0  # Ctrl-C at prompt


def test_draft_model_in_chat_gives_the_same_replies(dirs, inst):
    model, tok = inst
    draft, _ = mlx_openelm.load(dirs["draft"])
    plain, spec = (
        ChatSession(model, tok, max_tokens=N),
        ChatSession(model, tok, draft_model=draft, max_tokens=N),
    )
    for text in ("hi", "hello again"):
        assert "".join(r.text for r in plain.send(text)) == "".join(r.text for r in spec.send(text))
    # mlx-lm's speculative loop has not yet run its last token through the model when it
    # stops, so that one token is prefilled with the next turn.
    assert spec.turns[1].prefilled_tokens - plain.turns[1].prefilled_tokens in (0, 1)
    assert sum(t.draft_tokens for t in spec.turns) > 0


def test_save_and_load_transcript(dirs, inst, tmp_path):
    path = tmp_path / "t.jsonl"
    result = chat_cli(dirs["inst"], f"/system be brief\nhi\n/save {path}\n/quit\n")
    assert result.exit_code == 0, result.output
    saved = [json.loads(line) for line in path.read_text().splitlines()]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    model, tok = inst
    session = ChatSession(model, tok, max_tokens=N)
    session.load(path)
    assert session.messages == saved and session.system == "be brief"
    result = chat_cli(dirs["inst"], f"/load {path}\n/stats\nmore\n/stats\n")
    assert result.exit_code == 0 and f"(loaded 3 messages from {path})" in result.stderr
    assert stats_rows(result.stderr)[0][1] == len(tok.encode_chat([*saved, user("more")]))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read"),
        (b"\xff\xfe not utf-8", ":1: not valid UTF-8"),
        (b'{"role": "user", "content": "hi"}\nnot json\n', ":2: malformed JSON"),
        (b'{"role": "user", "content": ' + b"9" * 5000 + b"}\n", ":1: bad JSON value"),
        (b"[" * 100000 + b"]" * 100000 + b"\n", ":1: JSON nested too deeply"),
        (b'{"role": "user", "content": "\\ud800"}\n', ":1: a string at content holds a lone"),
        (b'{"role": "robot", "content": "hi"}\n', ':1: expected {"role"'),
        (
            b'{"role": "user", "content": "hi"}\n{"role": "system", "content": "x"}\n',
            ":2: a system",
        ),
    ],
)
def test_bad_load_file_is_one_line_and_the_session_goes_on(dirs, inst, tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_bytes(content)
    model, tok = inst
    with pytest.raises(DataError, match=re.escape(fragment)):
        ChatSession(model, tok).load(path)
    result = chat_cli(dirs["inst"], f"/load {path}\nhi\n/quit\n")
    assert result.exit_code == 1  # scripted session: a command failed
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in result.output
    assert result.stdout.count(">>> ") == 3  # it went on: the reply to "hi" was printed


def test_commands_and_bad_input(dirs):
    result = chat_cli(dirs["inst"], "/help\n/frobnicate\n/system\n/save\n")
    assert result.exit_code == 1
    assert "/reset" in result.stderr and "(system prompt: None)" in result.stderr
    assert "Error: unknown command /frobnicate; /help lists the commands" in result.stderr
    assert "Error: /save needs a file name" in result.stderr
    base = chat_cli(dirs["base"], "hi\n")
    assert base.exit_code == 1 and "needs an instruct model" in base.stderr
    assert "Traceback" not in base.output and len(base.stderr.strip().splitlines()) == 1
    bad = chat_cli(dirs["inst"], "hi\n", "--top-p", "0")
    assert bad.exit_code == 1 and "top_p (--top-p) must be in (0, 1]" in bad.stderr


def test_quantized_kv_cache_across_turns(tiny_spm, tmp_path):
    # KV quantization groups run along head_dim, so this model has head_dim 32 (OpenELM: 64).
    folder = make_model_dir(tmp_path / "m", tiny_spm, model_dim=128, head_dim=32, seed=3)
    model, tok = mlx_openelm.load(folder)
    session = ChatSession(model, tok, max_tokens=N, kv_bits=8, kv_group_size=32)
    for text in ("hi", "hello again"):
        assert "".join(r.text for r in session.send(text))
    first, second = session.turns
    assert second.prefilled_tokens == second.prompt_tokens - first.prompt_tokens - N
    assert type(session._cache[0]).__name__ == "QuantizedKVCache"
