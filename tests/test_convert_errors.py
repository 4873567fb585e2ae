"""Bad input through the real CLI: one clear line, exit code 1, nothing written. And interrupts:
Ctrl-C or a kill in the middle of a conversion leaves no OUTPUT."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from convert_fixtures import (
    corenet_state,
    write_corenet_pt,
    write_corenet_yaml,
    write_hf_safetensors,
)
from typer.testing import CliRunner

from mlx_openelm.cli import app

import torchfmt
from signals import popen_interruptible
from tiny import random_weights, tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(vocab_size=400)
    return cfg, random_weights(cfg, seed=5)


def fails(tmp_path: Path, tokenizer: Path, *args: str) -> str:
    """Run ``convert ARGS OUT``; assert one error line, exit 1 and no OUT; return the line."""
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", *args, str(out), "--tokenizer", str(tokenizer)])
    lines = result.output.splitlines()  # no blank line either (an empty progress display)
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp leftovers
    return " ".join(result.output.split())  # rich may wrap; compare on single spaces


def test_truncated_safetensors_header(tmp_path, tiny_spm, tiny):
    src = write_hf_safetensors(tmp_path / "src", *tiny)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    msg = fails(tmp_path, tiny_spm, str(src))
    assert "model.safetensors is not a valid safetensors file" in msg
    assert "file ends inside the header" in msg


def test_corrupt_safetensors_header(tmp_path, tiny_spm, tiny):
    src = write_hf_safetensors(tmp_path / "src", *tiny)
    garbage = b'{"oops": not json}'
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(garbage)) + garbage)
    assert "not a valid safetensors file" in fails(tmp_path, tiny_spm, str(src))


def test_safetensors_truncated_inside_the_data(tmp_path, tiny_spm, tiny):
    src = write_hf_safetensors(tmp_path / "src", *tiny)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    msg = fails(tmp_path, tiny_spm, str(src))
    assert "is damaged" in msg and "but the file has" in msg and "truncated" in msg


def test_missing_tensors_are_all_listed(tmp_path, tiny_spm, tiny):
    cfg, weights = tiny
    drop = [k for k in weights if "q_norm" in k] + ["transformer.norm.weight"]
    kept = {k: v for k, v in weights.items() if k not in drop}
    msg = fails(tmp_path, tiny_spm, str(write_hf_safetensors(tmp_path / "src", cfg, kept)))
    assert "missing 5 tensor(s)" in msg
    assert "transformer.layers.{0-3}.attn.q_norm.weight" in msg
    assert "transformer.norm.weight" in msg


def test_unexpected_tensors_are_listed(tmp_path, tiny_spm, tiny):
    cfg, weights = tiny
    extra = {**weights, "transformer.layers.1.attn.lora_a": weights["transformer.norm.weight"]}
    extra["bonus.weight"] = weights["transformer.norm.weight"]
    msg = fails(tmp_path, tiny_spm, str(write_hf_safetensors(tmp_path / "src", cfg, extra)))
    assert "unexpected 2 tensor(s)" in msg
    assert "transformer.layers.{1}.attn.lora_a" in msg and "bonus.weight" in msg
    assert "looks like a LoRA training checkpoint" in msg


def test_shape_disagreeing_with_config(tmp_path, tiny_spm, tiny):
    cfg, weights = tiny
    name = "transformer.layers.2.ffn.proj_2.weight"
    bad = {**weights, name: weights[name][:, :32]}
    msg = fails(tmp_path, tiny_spm, str(write_hf_safetensors(tmp_path / "src", cfg, bad)))
    want = tuple(weights[name].shape)
    assert f"shape mismatch: {name} (expected {want}, got ({want[0]}, 32))" in msg


def test_config_of_another_model_type(tmp_path, tiny_spm, tiny):
    src = write_hf_safetensors(tmp_path / "src", *tiny)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    msg = fails(tmp_path, tiny_spm, str(src))
    assert "config.json" in msg and "'llama'" in msg and "openelm" in msg


def test_folder_with_no_weights(tmp_path, tiny_spm, tiny):
    src = write_hf_safetensors(tmp_path / "src", *tiny)
    (src / "model.safetensors").unlink()
    msg = fails(tmp_path, tiny_spm, str(src))
    assert "has a config.json but no weights" in msg and "model.safetensors" in msg


def test_folder_that_is_no_model(tmp_path, tiny_spm):
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in fails(tmp_path, tiny_spm, str(tmp_path / "empty"))


def test_pt_with_a_forbidden_global(tmp_path, tiny_spm, tiny):
    marker = tmp_path / "pwned"
    evil = {"w": torchfmt.Reduce(torchfmt.Global("os", "system"), (f"touch {marker}",))}
    pt = torchfmt.save(evil, tmp_path / "evil.pt")
    msg = fails(tmp_path, tiny_spm, str(pt), "--size", "270M")
    assert "os.system" in msg and "refused" in msg
    assert not marker.exists()


def test_corenet_without_config(tmp_path, tiny_spm, tiny):
    pt = write_corenet_pt(tmp_path / "c.pt", {"norm.weight": tiny[1]["transformer.norm.weight"]})
    assert "--config-yaml" in fails(tmp_path, tiny_spm, str(pt))


def test_corenet_size_that_does_not_fit_the_checkpoint(tmp_path, tiny_spm):
    cfg = tiny_config(vocab_size=32000)  # 4 layers, dim 64: not a 270M checkpoint
    pt = write_corenet_pt(tmp_path / "small.pt", corenet_state(random_weights(cfg)))
    msg = fails(tmp_path, tiny_spm, str(pt), "--size", "270M")
    assert "missing 96 tensor(s): transformer.layers.{4-15}.attn_norm.weight" in msg
    assert "transformer.token_embeddings.weight (expected (32000, 1280), got (32000, 64))" in msg
    assert "check that --config-yaml / --size describes the model" in msg


def test_averaging_checkpoints_with_different_shapes(tmp_path, tiny_spm):
    small, wide = tiny_config(vocab_size=32000), tiny_config(vocab_size=32000, model_dim=128)
    a = write_corenet_pt(tmp_path / "a.pt", corenet_state(random_weights(small)))
    b = write_corenet_pt(tmp_path / "b.pt", corenet_state(random_weights(wide)))
    yml = write_corenet_yaml(tmp_path / "run.yaml", small)
    msg = fails(tmp_path, tiny_spm, "--average", str(a), str(b), "--config-yaml", str(yml))
    assert "cannot average" in msg and "shapes differ between a.pt and b.pt" in msg
    assert "token_embeddings.weight ((32000, 64) vs (32000, 128))" in msg


def test_several_sources_need_average(tmp_path, tiny_spm, tiny):
    src = write_hf_safetensors(tmp_path / "src", *tiny)
    assert "pass --average" in fails(tmp_path, tiny_spm, str(src), str(src))


def test_average_needs_two_sources_and_corenet_needs_a_file(tmp_path, tiny_spm, tiny):
    src = write_hf_safetensors(tmp_path / "src", *tiny)
    assert "at least two" in fails(tmp_path, tiny_spm, "--average", str(src))
    msg = fails(tmp_path, tiny_spm, str(src), "--from", "corenet", "--size", "270M")
    assert "is a folder; pass the CoreNet checkpoint file" in msg


def test_output_exists(tmp_path, tiny_spm, tiny):
    src = write_hf_safetensors(tmp_path / "src", *tiny)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    args = ["convert", str(src), str(tmp_path / "out"), "--tokenizer", str(tiny_spm)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "already exists" in result.output
    assert "--force" in result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_source_not_found(tmp_path, tiny_spm):
    assert "not found" in fails(tmp_path, tiny_spm, str(tmp_path / "nope.pt"))


_SLOW_CONVERT = textwrap.dedent(
    """
    import sys, time
    from mlx_openelm.convert import convert

    def hook(progress):
        if progress.phase == "convert":
            print("tensor", flush=True)
            time.sleep(0.2)

    convert(sys.argv[1], sys.argv[2], tokenizer=sys.argv[3], on_progress=hook)
    print("finished", flush=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_interrupted_conversion_leaves_no_output(tmp_path, tiny_spm, tiny, sig):
    src = write_hf_safetensors(tmp_path / "src", *tiny)
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", _SLOW_CONVERT, str(src), str(out), str(tiny_spm)]
    proc = popen_interruptible(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(3):  # a few tensors in: the temporary folder exists and holds data
        assert proc.stdout.readline().strip() == "tensor", proc.stderr.read()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "finished" not in rest
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    if sig == signal.SIGINT:  # cleaned up; a hard kill can only leave the hidden temp folder
        assert not leftovers


def test_dtype_choice_is_checked_by_the_cli(tmp_path, tiny_spm, tiny):
    src = write_hf_safetensors(tmp_path / "src", *tiny)
    args = ["convert", str(src), str(tmp_path / "out"), "--dtype", "int8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
