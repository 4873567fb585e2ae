"""Careless and hostile input through the real CLI: one clear line and exit 1, never a
traceback; and what is only worth a warning is said, never silent."""

from __future__ import annotations

import pytest
from conftest import make_model_dir
from typer.testing import CliRunner

from mlx_openelm.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_spm):
    root = tmp_path_factory.mktemp("hostile")
    return make_model_dir(root / "m", tiny_spm, seed=3, max_context_length=64)


def one_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "stdin", "fragments"),
    [
        # a command-line byte that is not UTF-8 reaches Python as a lone surrogate
        (["-p", "caf\udce9"], None, ("not valid UTF-8", "lone surrogate")),
        (["-p", "-"], b"caf\xe9\n", ("stdin is not UTF-8", "0xe9")),
        (
            ["-p", "hi", "-n", "4", "--kv-bits", "5"],
            None,
            ("--kv-bits", "head size (16)", "group (64)"),
        ),
        (["-p", "x " * 80], None, ("context holds 64", "shorten it")),
    ],
)
def test_generate_refuses_bad_prompts_and_options(model, args, stdin, fragments):
    result = runner.invoke(app, ["generate", "-m", str(model), *args], input=stdin)
    one_error(result, *fragments)


def test_a_reply_that_runs_past_the_context_is_said(model):
    result = runner.invoke(app, ["generate", "-m", str(model), "-p", "x " * 5, "-n", "60"])
    assert result.exit_code == 0, result.output
    assert "Warning: the prompt (" in result.stderr and "64-token context" in result.stderr


@pytest.mark.parametrize(
    ("port", "fragment"), [("70000", "--port must be between 0 and 65535"), ("-1", "--port")]
)
def test_serve_port_out_of_range(model, port, fragment):
    one_error(runner.invoke(app, ["serve", "-m", str(model), "--port", port]), fragment)


def test_error_lines_are_bounded(tmp_path):
    from mlx_openelm.cli import MAX_ERROR_CHARS

    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "' + "x" * 5_000_000 + '"}')
    line = one_error(runner.invoke(app, ["generate", "-m", str(bad), "-p", "hi"]))
    assert len(line) < MAX_ERROR_CHARS + 100
    assert "characters cut" in line and "model_type" in line and "mlx-lm" in line


def test_windows_and_bench_prompts_beyond_the_context_are_refused(model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello there"}\n')
    ppl = ["eval", "perplexity", "-m", str(model), "--data", str(data), "--seq-len", "100"]
    one_error(runner.invoke(app, ppl), "--seq-len) is 100, beyond the model's 64-token context")
    bench = ["bench", "-m", str(model), "-p", "100", "-g", "1", "-n", "1"]
    one_error(runner.invoke(app, bench), "prompt is 100 tokens", "context holds 64")
