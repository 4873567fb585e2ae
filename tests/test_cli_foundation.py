"""The CLI skeleton: help, version, the one error path, ``info``; and mlx-lm loading our folders."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
from typer.testing import CliRunner

from mlx_openelm import __version__
from mlx_openelm.cli import app
from mlx_openelm.loading import load

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"mlx-openelm {__version__}"


COMMANDS = ["info", "convert", "generate", "chat", "lora", "fuse", "export-peft", "import-peft",
            "plot", "export-gguf", "bench", "doctor", "serve", "eval"]  # fmt: skip


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    panel = result.output.split("Commands")[1]
    rows = re.findall(r"^│ (\S+) +(\S.*?) *│$", panel, flags=re.MULTILINE)
    # Every command, in --help order, each with the first words of its help text beside it.
    assert [name for name, _ in rows] == COMMANDS
    described = dict(rows)
    assert described["generate"].startswith("Generate text for a prompt")
    assert described["serve"].startswith("Serve an OpenAI-compatible API")
    assert "--debug" in result.output and "--version" in result.output


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_help_texts_are_not_eaten_as_markup():
    """rich reads ``[default: x]`` in a help string as a style tag and drops it from --help."""
    import typer
    from rich.markup import render

    checked = 0
    for path, command in _commands(typer.main.get_command(app)):
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        for text in texts:
            assert render(text).plain == text, (" ".join(path), text)
            checked += 1
    assert checked > 100  # every command and option of every subcommand was seen


def test_info_on_tiny_folder(tiny_model_dir):
    result = runner.invoke(app, ["info", "--model", str(tiny_model_dir), "--json"])
    assert result.exit_code == 0, result.output
    desc = json.loads(result.output)
    assert desc["layers"] == 4 and desc["num_query_heads"] == [2, 4, 4, 4]
    assert desc["dtype"] == "F32" and desc["chat_template"] == "yes"


def test_bad_model_is_one_line_and_exit_1(tmp_path):
    result = runner.invoke(app, ["info", "--model", str(tmp_path)])
    assert result.exit_code == 1
    lines = result.output.splitlines()  # no blank line either (an empty progress display)
    assert len(lines) == 1
    assert lines[0].startswith("Error:") and "no config.json" in lines[0]
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(tmp_path):
    # Through the real console script so the exception really propagates.
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_openelm.cli", "--debug", "info", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ModelNotFoundError" in proc.stderr


def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_openelm.cli", "info", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("Error:")


def test_our_folder_loads_with_mlx_lm_and_gives_the_same_logits(tiny_model_dir):
    import mlx_lm

    theirs, their_tok = mlx_lm.load(str(tiny_model_dir))
    ours, our_tok = load(tiny_model_dir)
    text = "hello world, this is a test"
    ids = our_tok.encode(text)
    assert their_tok.encode(text) == ids  # transformers reads our tokenizer_config.json alike
    a = np.array(ours(mx.array([ids])))
    b = np.array(theirs(mx.array([ids])))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
