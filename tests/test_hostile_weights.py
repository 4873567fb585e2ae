"""Hostile and damaged weight files through the real ``convert``: one bounded line, exit 1, no
OUTPUT, and no memory blow-up (deflate bombs, memo bombs, crafted safetensors headers); NaN/inf
weights refused by name unless ``--allow-nonfinite``."""

from __future__ import annotations

import json
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from convert_fixtures import write_hf_bin, write_hf_safetensors
from typer.testing import CliRunner

from mlx_openelm.cli import app

from tiny import random_weights, tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(vocab_size=400)
    return cfg, random_weights(cfg, seed=5)


def fails(tmp_path: Path, tokenizer: Path, src: Path, *extra: str) -> str:
    out = tmp_path / "out"
    tic = time.perf_counter()
    result = runner.invoke(app, ["convert", str(src), str(out), "--tokenizer", str(tokenizer),
                                 *extra])  # fmt: skip
    assert time.perf_counter() - tic < 20
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output[:2000]
    assert len(lines[0]) < 2200  # bounded, whatever the file quotes
    assert not out.exists()
    return lines[0]


def _header_file(folder: Path, config: dict, header: object, data: bytes = b"") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return folder


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        ([1, 2, 3], "expected a JSON object, got array"),
        ({"w": {"dtype": "F32", "shape": ["8"], "data_offsets": [0, 32]}}, "'shape' ['8']"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "not a list of sizes"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "not [begin, end]"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]}}, "not [begin, end]"),
        ({"w": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, "no string 'dtype'"),
        ({"w": "x" * 5_000_000}, "is not an object"),
        ({"w": {"dtype": "F32", "shape": ["x" * 10_000_000], "data_offsets": [0, 4]}}, "cut"),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            "b overlaps a",
        ),
    ],
)
def test_crafted_safetensors_headers(tmp_path, tiny_spm, tiny, header, fragment):
    src = _header_file(tmp_path / "src", tiny[0], header, b"\0" * 64)
    assert fragment in fails(tmp_path, tiny_spm, src)


def _torch_zip(path: Path, pickle_bytes: bytes, compress: bool) -> Path:
    with zipfile.ZipFile(
        path, "w", compression=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    ) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", b"3\n")
    return path


@pytest.mark.parametrize(
    ("pickle_bytes", "compress", "fragment"),
    [
        (b"\x80\x02" + b"N" * 30_000_000 + b".", True, "implausibly large"),  # a deflate bomb
        (b"\x80\x02Nr" + struct.pack("<I", 4_000_000_000) + b".", False, "memo index 4000000000"),
        (b"\x80\x02N" + b"q\xff" + b".", False, "memo index 255"),
        (b"\x80\x02X" + struct.pack("<I", 5_000_000) + b"a" * 5_000_000 + b"Q.", False, "cut"),
        (b"\x80\x02" + b"(" * 200_000 + b".", False, "cannot unpickle"),
    ],
)
def test_hostile_torch_archives(tmp_path, tiny_spm, tiny, pickle_bytes, compress, fragment):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny[0]))
    _torch_zip(src / "pytorch_model.bin", pickle_bytes, compress)
    assert fragment in fails(tmp_path, tiny_spm, src)


@pytest.mark.parametrize("writer", [write_hf_safetensors, write_hf_bin])
def test_nonfinite_weights_are_named_and_refused_unless_allowed(tmp_path, tiny_spm, tiny, writer):
    cfg, weights = tiny
    bad = dict(weights)
    name = "transformer.layers.1.attn.out_proj.weight"
    bad[name] = weights[name].copy()
    bad[name][0, 0] = np.nan
    src = writer(tmp_path / "src", cfg, bad)
    line = fails(tmp_path, tiny_spm, src)
    assert "1 tensor(s) hold NaN or infinite values" in line and name in line
    assert "--allow-nonfinite" in line
    out = tmp_path / "out"
    args = ["convert", str(src), str(out), "--tokenizer", str(tiny_spm), "--allow-nonfinite"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"Warning: converted with NaN/infinite values in {name}" in result.output
    assert (out / "model.safetensors").is_file()


def test_loading_a_crafted_model_folder_checks_its_header_first(tmp_path, tiny):
    # MLX's reader multiplies the shape in 64 bits and returns a (-2**31, -2**31, 4) tensor.
    header = {"w": {"dtype": "F32", "shape": [2**31, 2**31, 4], "data_offsets": [0, 0]}}
    folder = _header_file(tmp_path / "m", {**tiny[0], "model_type": "openelm"}, header)
    result = runner.invoke(app, ["generate", "-m", str(folder), "-p", "hi"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip()
    assert line.startswith("Error:") and "is damaged" in line and "spans 0 bytes" in line


def test_quality_probe_reports_nonfinite_logits_as_an_error(tmp_path, tiny_spm, tiny):
    cfg, weights = tiny
    bad = dict(weights)
    name = "transformer.norm.weight"
    bad[name] = np.full_like(weights[name], np.inf)
    src = write_hf_safetensors(tmp_path / "src", cfg, bad)
    out = tmp_path / "out"
    args = ["convert", str(src), str(out), "--tokenizer", str(tiny_spm), "--allow-nonfinite",
            "-q", "--group-size", "32", "--quality"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "quality probe" in result.output and "NaN or infinity" in result.output
    assert "KL" not in result.output.split("quality probe")[0]  # no "KL nan" summary before it
