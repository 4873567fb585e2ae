"""Quantized folders on the CPU: dequantized to float32 at load (same values), or kept packed."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_openelm import runtime
from mlx_openelm.config import ModelArgs
from mlx_openelm.folder import write_model_folder
from mlx_openelm.loading import load_model
from mlx_openelm.model import Model

from tiny import random_weights, rel_err, tiny_config

TOKENS = [1, 5, 9, 200, 33, 7, 7, 100, 3, 4]
ON_CPU = mx.default_device().type == mx.DeviceType.cpu
AUTO = "dequantized to float32 at load (CPU)" if ON_CPU else "quantized kernels (GPU)"


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """3 bits, 6 for the embedding and layer 0's qkv_proj (mlx-lm's per-module entries)."""
    cfg = tiny_config()
    model = Model(ModelArgs.from_dict(cfg))
    model.load_weights([(k, mx.array(v)) for k, v in random_weights(cfg, seed=7).items()])
    six = {"transformer.token_embeddings", "transformer.layers.0.attn.qkv_proj"}
    nn.quantize(
        model,
        group_size=32,
        bits=3,
        class_predicate=lambda p, m: (
            hasattr(m, "to_quantized") and ({"bits": 6, "group_size": 32} if p in six else True)
        ),
    )
    quant = {"group_size": 32, "bits": 3, **{p: {"group_size": 32, "bits": 6} for p in six}}
    folder = tmp_path_factory.mktemp("q") / "m"
    write_model_folder(
        folder, {**cfg, "quantization": quant}, iter(tree_flatten(model.parameters()))
    )
    return folder


def _logits(model):
    return np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))


def test_dequantized_at_load_gives_the_quantized_kernels_outputs(mixed_folder):
    packed, _ = load_model(mixed_folder, dequantize=False)
    packed.set_dtype(mx.float32)  # scales and norms in float32 too, so only kernels differ
    fast, _ = load_model(mixed_folder)  # CPU backend: auto
    assert fast.execution.dequantized and fast.execution.reason == "CPU"
    assert fast.execution.describe() == ("mixed 3/6-bit g32, dequantized to float32 at load (CPU)")
    kinds = {type(m) for _, m in tree_flatten(fast.leaf_modules(), is_leaf=nn.Module.is_module)}
    assert nn.QuantizedLinear not in kinds and nn.QuantizedEmbedding not in kinds
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(fast.parameters()))
    got, want = _logits(fast), _logits(packed)
    assert rel_err(got, want) < 1e-5
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_switch_and_memory_keep_the_quantized_kernels(mixed_folder, monkeypatch):
    monkeypatch.setenv(runtime.KEEP_ENV, "1")
    model, _ = load_model(mixed_folder, lazy=True)
    assert not model.execution.dequantized
    assert isinstance(model.layers[0].attn.qkv_proj, nn.QuantizedLinear)
    assert model.execution.describe() == (
        f"mixed 3/6-bit g32, quantized kernels ({runtime.KEEP_ENV}=1)"
    )
    monkeypatch.delenv(runtime.KEEP_ENV)
    monkeypatch.setattr(runtime, "available_memory", lambda: 1000)  # bytes: nothing fits
    model, _ = load_model(mixed_folder, lazy=True)
    assert not model.execution.dequantized and "GB free" in model.execution.reason


def test_float_folders_report_float_weights(tmp_path):
    cfg = tiny_config()
    write_model_folder(
        tmp_path / "f", cfg, ((k, mx.array(v)) for k, v in random_weights(cfg).items())
    )
    model, _ = load_model(tmp_path / "f", lazy=True)
    assert model.execution.describe() == "float weights"
    assert runtime.plan_execution(None, 10**12).quantization is None


def test_info_and_the_stats_line_say_how_a_quantized_folder_runs(tmp_path, tiny_spm):
    from typer.testing import CliRunner

    from mlx_openelm.cli import app
    from mlx_openelm.tokenizer import Tokenizer

    cfg = tiny_config(vocab_size=Tokenizer(tiny_spm).vocab_size)
    model = Model(ModelArgs.from_dict(cfg))
    model.load_weights([(k, mx.array(v)) for k, v in random_weights(cfg).items()])
    nn.quantize(model, group_size=32, bits=4)
    folder = tmp_path / "q4"
    config = {**cfg, "quantization": {"group_size": 32, "bits": 4}}
    tok = Tokenizer(tiny_spm)
    write_model_folder(folder, config, iter(tree_flatten(model.parameters())), tokenizer=tok)
    runner = CliRunner()
    info = runner.invoke(app, ["info", "--model", str(folder)])
    assert info.exit_code == 0, info.output
    assert "16 of 16 block linear layers, token embedding (also the output head)" in info.output
    assert f"4-bit g32, {AUTO}" in info.output
    args = ["generate", "--model", str(folder), "-p", "hi", "--max-tokens", "3", "--temp", "0"]
    gen = runner.invoke(app, args)
    assert gen.exit_code == 0, gen.output
    assert f"| weights: 4-bit g32, {AUTO}" in gen.output
    kept = runner.invoke(app, args, env={runtime.KEEP_ENV: "1"})
    assert f"| weights: 4-bit g32, quantized kernels ({runtime.KEEP_ENV}=1)" in kept.output
