"""Quantized conversion: the stored weights, mixed presets, loading in ours and mlx-lm, generating,
and the quality report checked against an independent float64 computation."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from convert_fixtures import write_hf_safetensors

from mlx_openelm.convert import convert
from mlx_openelm.convert.quality import PROBE_TEXT, PROBE_TOKENS
from mlx_openelm.errors import ConfigError
from mlx_openelm.loading import load, load_model, load_weights
from mlx_openelm.tokenizer import Tokenizer

from openelm_ref import forward, log_softmax
from tiny import random_weights, tiny_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    cfg = tiny_config(vocab_size=400)
    weights = random_weights(cfg, seed=7)
    folder = write_hf_safetensors(tmp_path_factory.mktemp("q") / "src", cfg, weights)
    return folder, cfg, weights


def _greedy_ours(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(mx.array([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_quantized_folder_loads_in_ours_and_mlx_lm_and_generates(tmp_path, tiny_spm, source):
    import mlx_lm
    from mlx_lm.generate import generate_step

    folder, cfg, _ = source
    result = convert(
        folder, tmp_path / "q4", quantize=True, bits=4, group_size=32, tokenizer=tiny_spm
    )
    assert result.quantization == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"] == (
        result.quantization
    )
    ours, tok = load(tmp_path / "q4", dequantize=False)
    assert isinstance(ours.transformer.token_embeddings, nn.QuantizedEmbedding)
    assert isinstance(ours.layers[0].attn.qkv_proj, nn.QuantizedLinear)
    theirs, _ = mlx_lm.load(str(tmp_path / "q4"))
    assert isinstance(theirs.transformer.token_embeddings, nn.QuantizedEmbedding)
    prompt = tok.encode("hello world")
    mine = _greedy_ours(ours, prompt, 8)
    steps = generate_step(mx.array(prompt), theirs, max_tokens=8)
    assert [int(t) for t, _ in steps] == mine


@pytest.mark.parametrize("bits, group_size", [(2, 32), (3, 64), (4, 64), (6, 32), (8, 128)])
def test_stored_weights_dequantize_to_the_source(tmp_path, tiny_spm, source, bits, group_size):
    folder, _, weights = source
    out = tmp_path / "q"
    convert(folder, out, quantize=True, bits=bits, group_size=group_size, tokenizer=tiny_spm)
    stored = load_weights(out)
    quantized = [k.removesuffix(".scales") for k in stored if k.endswith(".scales")]
    assert ("transformer.token_embeddings" in quantized) == (64 % group_size == 0)  # dim 64
    for name, w in weights.items():
        path = name.removesuffix(".weight")
        if path not in quantized:  # norms, and widths the group size does not divide
            assert stored[name].dtype == mx.float16
            assert w.ndim == 1 or w.shape[-1] % group_size
            continue
        q, s, b = stored[name], stored[f"{path}.scales"], stored[f"{path}.biases"]
        assert q.shape[-1] * 32 // bits == w.shape[-1]  # packed bits-wide codes in uint32
        deq = np.array(mx.dequantize(q, s, b, group_size=group_size, bits=bits), np.float32)
        step = np.repeat(np.abs(np.array(s, np.float32)), group_size, axis=-1)
        w16 = np.array(mx.array(w).astype(mx.float16), np.float32)
        # MLX's affine grid keeps 0 exact, so a weight may sit up to ~one step from its code;
        # on average rounding costs a quarter step.
        err = np.abs(deq - w16) / step
        assert err.max() <= 1.1 and err.mean() <= 0.4


def test_mixed_preset_gives_more_bits_where_it_pays(tmp_path, tiny_spm):
    import mlx_lm

    cfg = tiny_config(vocab_size=400, num_transformer_layers=16)
    src = write_hf_safetensors(tmp_path / "src", cfg, random_weights(cfg, seed=1))
    result = convert(src, tmp_path / "mixed", mixed="mixed_3_6", group_size=32, tokenizer=tiny_spm)
    q = result.quantization
    assert (q["bits"], q["group_size"]) == (3, 32)
    high = {k for k, v in q.items() if isinstance(v, dict)}
    assert all(q[k]["bits"] == 6 for k in high)
    # first and last eighth (0, 1, 14, 15) and every third layer in between (4, 7, 10, 13)
    layers = [0, 1, 4, 7, 10, 13, 14, 15]
    want = {f"transformer.layers.{i}.{m}" for i in layers for m in ("attn.qkv_proj", "ffn.proj_2")}
    assert high == want | {"transformer.token_embeddings"}
    stored = load_weights(tmp_path / "mixed")
    for path in ("transformer.layers.4.ffn.proj_2", "transformer.layers.5.ffn.proj_2"):
        bits = 6 if path in high else 3
        in_dim = mx.dequantize(
            stored[f"{path}.weight"], stored[f"{path}.scales"], stored[f"{path}.biases"], 32, bits
        ).shape[-1]
        assert stored[f"{path}.weight"].shape[-1] * 32 // bits == in_dim
    ours, _ = load_model(tmp_path / "mixed", dequantize=False)
    theirs, _ = mlx_lm.load(str(tmp_path / "mixed"))
    assert ours.layers[4].ffn.proj_2.bits == theirs.layers[4].ffn.proj_2.bits == 6
    assert ours.layers[5].ffn.proj_2.bits == theirs.layers[5].ffn.proj_2.bits == 3
    x = mx.array([[1, 2, 3, 4, 5]])
    assert np.allclose(np.array(ours(x)), np.array(theirs(x)), atol=1e-2)


def test_quality_report_agrees_with_an_independent_computation(tmp_path, tiny_spm, source):
    folder, cfg, weights = source
    out = tmp_path / "q3"
    result = convert(
        folder,
        out,
        dtype="float32",
        quantize=True,
        bits=3,
        group_size=32,
        tokenizer=tiny_spm,
        quality=True,
    )
    report = result.quality
    ids = Tokenizer(tiny_spm).encode(PROBE_TEXT)[:PROBE_TOKENS]
    assert report.tokens == len(ids) > 100
    log_p = log_softmax(forward(weights, ids, cfg["head_dim"]))  # float64 reference
    model, _ = load_model(out)
    model.set_dtype(mx.float32)
    log_q = log_softmax(np.array(model(mx.array([ids]))[0], np.float64))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    nll = lambda lp: -lp[np.arange(len(ids) - 1), ids[1:]].mean()  # noqa: E731
    assert report.kl_mean == pytest.approx(kl.mean(), rel=1e-3, abs=1e-5)
    assert report.kl_max == pytest.approx(kl.max(), rel=1e-3)
    assert report.ppl_reference == pytest.approx(np.exp(nll(log_p)), rel=1e-3)
    assert report.ppl_quantized == pytest.approx(np.exp(nll(log_q)), rel=1e-3)
    agree = (log_p.argmax(-1) == log_q.argmax(-1)).mean()
    assert report.top1_agreement == pytest.approx(agree, abs=1.5 / len(ids))


def test_fewer_bits_cost_more(tmp_path, tiny_spm, source):
    folder, _, _ = source
    kl = {}
    for bits in (2, 4, 8):
        r = convert(folder, tmp_path / f"q{bits}", quantize=True, bits=bits, group_size=32,
                    tokenizer=tiny_spm, quality=True)  # fmt: skip
        kl[bits] = r.quality.kl_mean
    assert 0 <= kl[8] < kl[4] < kl[2]
    assert kl[8] < 1e-3


def test_unsupported_quantization_options_are_refused_before_writing(tmp_path, tiny_spm, source):
    folder, _, _ = source
    for options, words in [
        ({"bits": 5}, "--bits"),
        ({"group_size": 16}, "--group-size"),
        ({"mixed": "mixed_9_9"}, "mixed_3_6"),
    ]:
        with pytest.raises(ConfigError, match=words):
            convert(folder, tmp_path / "q", quantize=True, tokenizer=tiny_spm, **options)
        assert not (tmp_path / "q").exists()


def test_cli_quality_probe_runs_by_default_below_1b(tmp_path, tiny_spm, source):
    from typer.testing import CliRunner

    from mlx_openelm.cli import app

    folder, _, _ = source
    base = ["convert", str(folder), "--tokenizer", str(tiny_spm), "-q", "--group-size", "32"]
    runner = CliRunner()
    auto = runner.invoke(app, [*base[:2], str(tmp_path / "a"), *base[2:]])
    assert auto.exit_code == 0, auto.output
    assert "4-bit g32 (5.00 bits/weight)" in auto.output
    assert "tokens of built-in English passage: perplexity" in auto.output
    assert "KL" in auto.output and "top-1 agreement" in auto.output
    off = runner.invoke(app, [*base[:2], str(tmp_path / "b"), *base[2:], "--no-quality"])
    assert off.exit_code == 0, off.output
    assert "Quantization cost" not in off.output and "Quality probe skipped" not in off.output
