"""Without lm-eval (the [eval] extra) `eval lm-eval` says how to install it, in one line."""

from __future__ import annotations

import sys

from typer.testing import CliRunner

from mlx_openelm.cli import app


def test_missing_lm_eval_is_one_line_with_the_install_command(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    result = CliRunner().invoke(app, ["eval", "lm-eval", "-m", str(tiny_model_dir), "--tasks", "x"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'mlx-openelm[eval]'" in lines[0]
