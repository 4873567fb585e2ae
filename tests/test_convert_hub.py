"""Hub sources, read from a real (temporary) Hugging Face cache directory in offline mode.

The cache is laid out as huggingface_hub lays it out (``models--org--name/snapshots/<commit>/``
plus ``refs/main``); huggingface_hub itself resolves it. The CLI test runs in a subprocess with
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` in its environment, the way a user sets them; in-process
tests also set ``huggingface_hub.constants``, which huggingface_hub reads once at import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from convert_fixtures import model_logits, reference_logits, write_hf_bin, write_hf_safetensors
from huggingface_hub import constants as hf_constants

from mlx_openelm.convert import convert
from mlx_openelm.errors import ModelNotFoundError
from mlx_openelm.tokenizer import ZEPHYR_CHAT_TEMPLATE, Tokenizer

from tiny import random_weights, rel_err, tiny_config

COMMIT = "c0ffee" * 6 + "abcd"
REPO = "apple/OpenELM-tiny-Instruct"


def add_repo(cache: Path, repo: str, files_from: Path, commit: str = COMMIT) -> Path:
    """Put a model folder's files into ``cache`` as huggingface_hub would have downloaded them."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(vocab_size=400)
    return cfg, random_weights(cfg, seed=9)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_cli_converts_a_cached_repo_offline(tmp_path, tiny_spm, tiny):
    cfg, weights = tiny
    staged = write_hf_safetensors(tmp_path / "staged", cfg, weights)
    (staged / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    shutil.copy(tiny_spm, staged / "tokenizer.model")  # so no Llama-2 download is needed
    cache = tmp_path / "hf" / "hub"
    add_repo(cache, REPO, staged)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mlx_openelm.cli", "convert", REPO, str(out), "--dtype", "float32"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"Wrote {out}" in proc.stdout and "parameters" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["source"] == {"format": "hf", "repo_id": REPO, "revision": COMMIT}
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1}
    assert Tokenizer.from_folder(out).chat_template == ZEPHYR_CHAT_TEMPLATE  # an -Instruct repo
    assert rel_err(model_logits(out, cfg), reference_logits(weights, cfg)) <= 1e-4


def test_bin_only_repo_falls_back_to_pytorch_model_bin(tmp_path, offline_cache, tiny_spm, tiny):
    cfg, weights = tiny
    staged = write_hf_bin(tmp_path / "staged", cfg, weights, shards=2)
    add_repo(offline_cache, "apple/OpenELM-tiny", staged)
    result = convert("apple/OpenELM-tiny", tmp_path / "out", dtype="float32", tokenizer=tiny_spm)
    assert result.source["repo_id"] == "apple/OpenELM-tiny"
    assert Tokenizer.from_folder(tmp_path / "out").chat_template is None
    assert rel_err(model_logits(tmp_path / "out", cfg), reference_logits(weights, cfg)) <= 1e-4


def test_load_converts_a_repo_once_into_the_model_cache(tmp_path, offline_cache, tiny_spm, tiny,
                                                        monkeypatch):  # fmt: skip
    from mlx_openelm.loading import cache_root, load

    cfg, weights = tiny
    staged = write_hf_safetensors(tmp_path / "staged", cfg, weights)
    shutil.copy(tiny_spm, staged / "tokenizer.model")
    add_repo(offline_cache, REPO, staged)
    monkeypatch.setenv("MLX_OPENELM_HOME", str(tmp_path / "home"))
    model, tokenizer = load(REPO)
    folder = cache_root() / "apple--OpenELM-tiny-Instruct"
    assert (folder / "config.json").is_file() and tokenizer.chat_template == ZEPHYR_CHAT_TEMPLATE
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    load(REPO)  # second time: reused, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_uncached_repo_offline_says_what_to_do(tmp_path, offline_cache, tiny_spm):
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        convert("apple/OpenELM-nothing", tmp_path / "out", tokenizer=tiny_spm)
    assert not (tmp_path / "out").exists()
