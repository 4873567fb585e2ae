"""Perplexity and multiple-choice scoring against an independent float64 reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model_dir, one_error_line
from typer.testing import CliRunner

from mlx_openelm.cli import app
from mlx_openelm.errors import DataError
from mlx_openelm.evaluate import (
    ChoiceQuestion,
    choice_loglikelihoods,
    encode_pair,
    evaluate_choice,
    perplexity,
    read_choice_tasks,
    read_texts,
    window_spans,
)
from mlx_openelm.loading import load_model
from mlx_openelm.tokenizer import Tokenizer

from openelm_ref import forward, log_softmax
from tiny import random_weights, tiny_config

EXAMPLE_TASKS = (
    Path(__file__).resolve().parents[1] / "mlx_openelm" / "data" / "example_choice.jsonl"
)
SEED = 7
TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Every cloud has a silver lining, and the early bird catches the worm."
)
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_spm):
    """(folder, model, tokenizer, float64 reference weights) of one tiny random model."""
    folder = make_model_dir(tmp_path_factory.mktemp("eval") / "m", tiny_spm, seed=SEED)
    tok = Tokenizer.from_folder(folder)
    ref = random_weights(tiny_config(vocab_size=tok.vocab_size), seed=SEED)
    model, _ = load_model(folder)
    return folder, model, tok, ref


def ref_nll(ref, tokens: list[int], targets: range) -> float:
    """Summed NLL of ``tokens[t]`` for t in ``targets``, given ``tokens`` (float64)."""
    logp = log_softmax(forward(ref, tokens, head_dim=16))
    return -sum(logp[t - 1, tokens[t]] for t in targets)


def ref_perplexity(ref, ids: list[int], seq_len: int, stride: int) -> tuple[float, int]:
    """Written from the Hugging Face guide: each window scores what the last one did not."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        window = ids[begin:end]
        targets = range(max(prev_end - begin, 1), len(window))
        nll += ref_nll(ref, window, targets)
        count += len(targets)
        prev_end = end
        if end == len(ids):
            break
    return nll, count


# --- Windows and perplexity --------------------------------------------------------------------


def test_window_spans_hand_computed():
    assert window_spans(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert window_spans(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert window_spans(5, 8, 4) == [(0, 5, 1)]
    assert window_spans(1, 8, 4) == []


@pytest.mark.parametrize("n,seq_len,stride", [(37, 8, 3), (37, 8, 8), (16, 16, 5), (50, 7, 1)])
def test_window_spans_score_every_token_once_with_overlap_context(n, seq_len, stride):
    scored = []
    for begin, end, first in window_spans(n, seq_len, stride):
        assert begin < first < end and end - begin <= seq_len
        if begin > 0 and stride < seq_len:  # every target sees the overlap as context
            assert first - begin >= seq_len - stride
        scored += range(first, end)
    assert len(scored) == len(set(scored))
    # Without overlap each window's first token has no context and goes unscored.
    unscored = {0} if stride < seq_len else set(range(0, n, seq_len))
    assert set(scored) == set(range(n)) - unscored


@pytest.mark.parametrize("seq_len,stride,batch", [(16, 6, 1), (16, 16, 1), (12, 5, 3)])
def test_perplexity_matches_float64_reference(tiny, seq_len, stride, batch):
    _, model, tok, ref = tiny
    texts = [TEXT, "Short one.", TEXT[:60]]
    result = perplexity(model, tok, texts, seq_len=seq_len, stride=stride, batch_size=batch)
    nll = count = 0
    for text in texts:
        n, c = ref_perplexity(ref, tok.encode(text, add_bos=True), seq_len, stride)
        nll, count = nll + n, count + c
    assert result.tokens == count and result.documents == 3
    assert abs(result.nll - nll / count) / (nll / count) < 1e-4
    assert abs(result.perplexity - math.exp(nll / count)) / math.exp(nll / count) < 1e-4


def test_perplexity_with_overlap_scores_each_token_once(tiny):
    _, model, tok, _ = tiny
    n = len(tok.encode(TEXT))
    assert n > 30
    for stride in (1, 4, 15):
        assert perplexity(model, tok, [TEXT], seq_len=16, stride=stride).tokens == n - 1
    assert perplexity(model, tok, [TEXT], seq_len=16, stride=16).tokens < n - 1


def test_progress_callback_counts_windows(tiny):
    _, model, tok, _ = tiny
    seen = []
    result = perplexity(
        model, tok, [TEXT], seq_len=16, stride=8, on_progress=lambda *a: seen.append(a)
    )
    assert seen[-1] == (result.windows, result.windows) and len(seen) == result.windows


@pytest.mark.parametrize(
    "seq_len,stride,batch,match",
    [
        (1, 1, 1, "at least 2"),
        (8, 9, 1, "between 1 and"),
        (8, 0, 1, "between 1 and"),
        (8, 4, 0, "batch"),
    ],
)
def test_bad_window_settings(tiny, seq_len, stride, batch, match):
    _, model, tok, _ = tiny
    with pytest.raises(DataError, match=match):
        perplexity(model, tok, [TEXT], seq_len=seq_len, stride=stride, batch_size=batch)


def test_nothing_to_score(tiny):
    _, model, tok, _ = tiny
    with pytest.raises(DataError, match="shorter than 2 tokens"):
        perplexity(model, tok, [""], seq_len=8, stride=4)


# --- Reading files -----------------------------------------------------------------------------


def test_read_texts_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert read_texts(tmp_path / "a.txt") == ["line one\nline two"]
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n\n{"text": "y", "id": 3}\n')
    assert read_texts(tmp_path / "a.jsonl") == ["x", "y"]


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "is empty"),
        ("  \n\n", "is empty"),
        ('{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: malformed JSON"),
        ('{"text": "ok"}\n{"txt": "x"}\n', r"bad\.jsonl:2: needs a string field \"text\""),
        ('["text"]\n', r"bad\.jsonl:1: expected a JSON object"),
    ],
)
def test_read_texts_errors(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        read_texts(tmp_path / "bad.jsonl")


def test_read_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_choice_tasks(tmp_path / "nope.jsonl")


def test_example_tasks_file_is_valid():
    questions = read_choice_tasks(EXAMPLE_TASKS)
    assert len(questions) >= 5
    assert all(0 <= q.answer < len(q.choices) for q in questions)


@pytest.mark.parametrize(
    "line,match",
    [
        (
            '{"context": "c", "choices": ["a", "b"], "answer": 2}',
            r":2: \"answer\" is 2 but there are 2",
        ),
        ('{"context": "c", "choices": ["a", "b"], "answer": -1}', r":2: \"answer\" is -1"),
        (
            '{"context": "c", "choices": ["a", "b"], "answer": "0"}',
            r":2: \"answer\" must be an integer",
        ),
        (
            '{"context": "c", "choices": ["a", "b"], "answer": true}',
            r":2: \"answer\" must be an integer",
        ),
        (
            '{"context": "c", "choices": ["a"], "answer": 0}',
            r":2: \"choices\" must be a list of at least two",
        ),
        ('{"context": "c", "choices": ["a", ""], "answer": 0}', r":2: every entry"),
        ('{"choices": ["a", "b"], "answer": 0}', r":2: needs a string field \"context\""),
        ('{"context": "c", "choices": ["a", "b"], "answer": 0', r":2: malformed JSON"),
    ],
)
def test_read_choice_tasks_errors(tmp_path, line, match):
    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "ok", "choices": ["a", "b"], "answer": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=match):
        read_choice_tasks(path)


# --- Multiple choice ---------------------------------------------------------------------------


def test_encode_pair_matches_lm_eval_split(tiny):
    _, _, tok, _ = tiny
    ctx, cont = encode_pair(tok, "The sky is", " blue today")
    whole = tok.encode("The sky is blue today", add_bos=True)
    assert ctx == tok.encode("The sky is", add_bos=True) and ctx + cont == whole
    # Trailing spaces move to the continuation: same tokens as without them.
    assert encode_pair(tok, "The sky is ", "blue today") == (ctx, cont)
    assert encode_pair(tok, "", "blue") == ([tok.bos_id], tok.encode("blue", add_bos=False))


def ref_choice_lls(ref, tok, q: ChoiceQuestion) -> list[float]:
    """Log-likelihood of each choice by a full float64 forward of context + continuation."""
    context = tok.encode(q.context, add_bos=True)
    lls = []
    for choice in q.choices:
        whole = tok.encode(q.context + " " + choice, add_bos=True)
        lls.append(-ref_nll(ref, whole, range(len(context), len(whole))))
    return lls


QUESTIONS = [
    ChoiceQuestion("The cat sat on the", ("mat", "big red sofa by the window", "a"), 0),
    ChoiceQuestion("Two plus two is", ("four", "five", "fish and chips"), 0),
    ChoiceQuestion("Once upon a time", ("there was a king.", "x", "the end", "zzz qqq"), 0),
    ChoiceQuestion("Water is", ("wet", "dry and dusty", "blue"), 0),
    ChoiceQuestion("Hello", ("world", "there, my old friend"), 0),
]


def test_choice_loglikelihoods_match_float64_reference(tiny):
    _, model, tok, ref = tiny
    for q in QUESTIONS:
        ours = choice_loglikelihoods(model, tok, q)
        expected = ref_choice_lls(ref, tok, q)
        np.testing.assert_allclose(ours, expected, rtol=1e-4)


def test_scorer_picks_the_known_answer(tiny):
    """Answers set from the reference likelihoods: acc must be exactly what they imply."""
    _, model, tok, ref = tiny
    best, worst, norm_best, questions = [], [], [], []
    for q in QUESTIONS:
        lls = ref_choice_lls(ref, tok, q)
        best.append(ChoiceQuestion(q.context, q.choices, int(np.argmax(lls))))
        worst.append(ChoiceQuestion(q.context, q.choices, int(np.argmin(lls))))
        per_char = [x / len(c) for x, c in zip(lls, q.choices)]
        norm_best.append(int(np.argmax(per_char)))
        questions.append(q)
    result = evaluate_choice(model, tok, best)
    assert result.acc == 1.0 and result.predictions == [q.answer for q in best]
    assert result.predictions_norm == norm_best
    assert evaluate_choice(model, tok, worst).acc == 0.0
    # At least one question where length normalisation changes the pick, so acc_norm is tested.
    assert any(n != q.answer for n, q in zip(norm_best, best))
    assert result.acc_norm == np.mean([n == q.answer for n, q in zip(norm_best, best)])


def test_choice_truncates_long_context_from_the_left(tiny):
    _, model, tok, ref = tiny
    q = ChoiceQuestion(TEXT, ("and so on", "the end"), 0)
    ours = choice_loglikelihoods(model, tok, q, max_length=12)
    context = tok.encode(TEXT, add_bos=True)
    for choice, ll in zip(q.choices, ours):
        cont = encode_pair(tok, TEXT, " " + choice)[1]
        seq = (context + cont)[-13:]
        assert ll == pytest.approx(-ref_nll(ref, seq, range(13 - len(cont), 13)), rel=1e-4)


def test_choice_progress_and_stderr(tiny):
    _, model, tok, _ = tiny
    seen = []
    result = evaluate_choice(model, tok, QUESTIONS, on_progress=lambda *a: seen.append(a))
    assert seen == [(i, len(QUESTIONS)) for i in range(1, len(QUESTIONS) + 1)]
    p, n = result.acc, len(QUESTIONS)
    assert result.acc_stderr == pytest.approx(math.sqrt(p * (1 - p) * n / (n - 1) / n))


def test_choice_errors(tiny):
    _, model, tok, _ = tiny
    with pytest.raises(DataError, match="more than max_length=2"):
        choice_loglikelihoods(model, tok, ChoiceQuestion("a", ("b c d e f", "g"), 0), max_length=2)
    # Without a delimiter a choice can merge into the context's last token and add nothing.
    merged = next(
        (c, x)
        for c, x in (("th", "e"), ("hel", "lo"), ("a", "b"), ("wor", "ld"))
        if len(tok.encode(c + x)) <= len(tok.encode(c))
    )
    with pytest.raises(DataError, match="adds no token"):
        choice_loglikelihoods(model, tok, ChoiceQuestion(merged[0], (merged[1], "zz"), 0), "")
    with pytest.raises(DataError, match="no questions"):
        evaluate_choice(model, tok, [])


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_perplexity_text_and_json(tiny, tmp_path):
    folder, model, tok, _ = tiny
    data = tmp_path / "wiki.txt"
    data.write_text(TEXT + "\n")
    args = ["eval", "perplexity", "-m", str(folder), "--data", str(data), "--seq-len", "16"]
    expected = perplexity(model, tok, [TEXT], seq_len=16, stride=4)
    result = runner.invoke(app, [*args, "--stride", "4"])
    assert result.exit_code == 0, result.output
    assert f"tokens scored {expected.tokens}" in result.output
    assert expected.perplexity > 1e6  # random weights: printed in e-notation, not 20 digits
    assert f"perplexity    {expected.perplexity:.4e}" in result.output
    result = runner.invoke(app, [*args, "--stride", "4", "--json"])
    assert json.loads(result.output)["tokens"] == expected.tokens
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": "Hello"}) + "\n")
    result = runner.invoke(app, [*args[:4], "--data", str(jsonl), "--json"])
    assert json.loads(result.output)["documents"] == 2


def test_cli_choice_on_the_example_file(tiny):
    folder, model, tok, _ = tiny
    questions = read_choice_tasks(EXAMPLE_TASKS)
    expected = evaluate_choice(model, tok, questions[:5])
    args = ["eval", "choice", "-m", str(folder), "--tasks", str(EXAMPLE_TASKS), "--limit", "5"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["questions"] == 5
    assert data["acc"] == expected.acc and data["acc_norm"] == expected.acc_norm
    result = runner.invoke(app, args)
    assert f"acc       {expected.acc:.4f}" in result.output
    assert f"acc_norm  {expected.acc_norm:.4f}" in result.output


@pytest.mark.parametrize(
    "content,extra,match",
    [
        (None, [], "does not exist"),
        ("", [], "is empty"),
        (TEXT, ["--seq-len", "1"], "at least 2"),
        (TEXT, ["--seq-len", "8", "--stride", "9"], "between 1 and seq_len"),
    ],
)
def test_cli_perplexity_bad_inputs(tiny, tmp_path, content, extra, match):
    data = tmp_path / "d.txt"
    if content is not None:
        data.write_text(content)
    cmd = ["eval", "perplexity", "-m", str(tiny[0]), "--data", str(data), *extra]
    assert match in one_error_line(runner.invoke(app, cmd))


def test_cli_perplexity_malformed_jsonl(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "broken"\n')
    cmd = ["eval", "perplexity", "-m", str(tiny[0]), "--data", str(data)]
    assert f"{data}:2: malformed JSON" in one_error_line(runner.invoke(app, cmd))


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"context": "c", "choices": ["a", "b"], "answer": 5}', ':1: "answer" is 5'),
        ('{"context": "c", "choices": ["a", "b"], "answer": 0', ":1: malformed JSON"),
    ],
)
def test_cli_choice_bad_inputs(tiny, tmp_path, line, match):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(line + "\n")
    cmd = ["eval", "choice", "-m", str(tiny[0]), "--tasks", str(tasks)]
    assert f"{tasks}{match}" in one_error_line(runner.invoke(app, cmd))


def test_cli_eval_missing_model(tmp_path):
    cmd = ["eval", "choice", "-m", str(tmp_path / "nope"), "--tasks", str(EXAMPLE_TASKS)]
    assert "not found" in one_error_line(runner.invoke(app, cmd))


def test_cli_perplexity_applies_the_adapter(tiny, tmp_path):
    """An adapter with non-zero LoRA weights changes the perplexity to that of the adapted model."""
    from lora_helpers import write_random_lora

    from mlx_openelm.loading import load_adapters

    folder, model, tok, _ = tiny
    out = write_random_lora(folder, tmp_path / "adapter")
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    cmd = ["eval", "perplexity", "-m", str(folder), "--data", str(data), "--seq-len", "32"]
    plain = runner.invoke(app, [*cmd, "--json"])
    assert plain.exit_code == 0, plain.output
    result = runner.invoke(app, [*cmd, "--json", "--adapter", str(out)])
    assert result.exit_code == 0, result.output
    plain, with_adapter = (json.loads(r.output)["perplexity"] for r in (plain, result))
    fresh, _ = load_model(folder)
    expected = perplexity(load_adapters(fresh, out), tok, [TEXT], seq_len=32, stride=16)
    assert with_adapter == pytest.approx(expected.perplexity, rel=1e-6)
    assert abs(with_adapter - plain) / plain > 1e-3
