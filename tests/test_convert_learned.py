"""Learned quantization (convert --method): folders of every method load in ours and mlx-lm with
the same outputs, GPTQ's packing of any width, the bit allocation of dynamic, bad input."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from convert_fixtures import write_hf_safetensors
from typer.testing import CliRunner

from mlx_openelm.cli import app
from mlx_openelm.convert import convert
from mlx_openelm.convert.learned import allocate_bits, pack_codes
from mlx_openelm.errors import ConfigError, DataError
from mlx_openelm.loading import load_model

from tiny import random_weights, tiny_config

TEXT = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. "
    "A small bird sings on the old wooden fence, and the river runs quietly past the mill. "
)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learned")
    cfg = tiny_config(vocab_size=400)
    folder = write_hf_safetensors(tmp / "src", cfg, random_weights(cfg, seed=3))
    calib = tmp / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": TEXT * 6}) + "\n" for _ in range(12)))
    return folder, calib


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_pack_codes_matches_mlx_quantize(bits):
    w = mx.random.normal((8, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, group_size=32, bits=bits)
    assert mx.array_equal(pack_codes(w, bits, scales, biases), packed).item()


def test_allocation_spends_the_budget_on_the_most_sensitive_layers():
    sizes = {"a": 100, "b": 100, "c": 200}
    widths = {p: 3 for p in sizes}
    sens = {"a": 0.1, "b": 5.0, "c": 1.0}
    # 3-bit g64 costs 3.5 bits/weight, 6-bit 6.5: room for 100 of 400 weights at 6 bits
    got = allocate_bits(sens, sizes, widths, 6, 64, budget=3.5 + 3 * 100 / 400)
    assert got == {"a": 3, "b": 6, "c": 3}


@pytest.mark.parametrize("method", ["gptq", "awq", "dwq", "dynamic"])
def test_every_method_writes_a_folder_mlx_lm_loads_with_our_outputs(
    tmp_path, tiny_spm, source, method
):
    import mlx_lm

    folder, calib = source
    extra = {"bits_per_weight": 5.0} if method == "dynamic" else {}
    result = convert(folder, tmp_path / method, method=method, bits=4, group_size=32,
                     calibration=calib, calibration_samples=6, tokenizer=tiny_spm,
                     quality=True, **extra)  # fmt: skip
    config = json.loads((tmp_path / method / "config.json").read_text())
    assert config["quantization"] == result.quantization and result.method == method
    assert config["converted_by"]["method"] == method
    r = result.quality
    assert np.isfinite([r.kl_mean, r.ppl_quantized]).all() and r.text == str(calib)
    ours, _ = load_model(tmp_path / method, dequantize=False)
    theirs, _ = mlx_lm.load(str(tmp_path / method))
    x = mx.array([[1, 5, 9, 30, 7, 100, 3]])
    np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), atol=1e-2)
    if method == "dynamic":  # 3 and 6 bits mixed to the 4-bit g32 budget (5.0 bits/weight)
        q = result.quantization
        widths = {q["bits"]} | {v["bits"] for v in q.values() if isinstance(v, dict)}
        assert widths == {3, 6} and 4.0 < result.bits_per_weight <= 5.0


def test_dwq_beats_round_to_nearest_on_its_calibration_text(tmp_path, tiny_spm, source):
    folder, calib = source
    kl = {}
    for method in ("rtn", "dwq"):
        kw = {} if method == "rtn" else {"method": method, "calibration_samples": 6}
        r = convert(folder, tmp_path / method, quantize=True, bits=2, group_size=32,
                    calibration=calib, tokenizer=tiny_spm, quality=True, **kw)  # fmt: skip
        kl[method] = r.quality.kl_mean
    assert kl["dwq"] < kl["rtn"], kl


def test_dwq_that_makes_things_worse_keeps_its_gptq_start(tmp_path, tiny_spm, source, monkeypatch):
    import mlx_openelm.convert.learned as learned
    from mlx_openelm.errors import OpenELMWarning

    folder, calib = source
    kw = {"bits": 3, "group_size": 32, "calibration": calib, "calibration_samples": 6,
          "tokenizer": tiny_spm, "quality": False}  # fmt: skip
    convert(folder, tmp_path / "gptq", method="gptq", **kw)
    monkeypatch.setattr(learned, "DWQ_LEARNING_RATE", 10.0)  # Adam at lr 10 wrecks the grids
    with pytest.warns(OpenELMWarning, match="kept its GPTQ start"):
        convert(folder, tmp_path / "dwq", method="dwq", **kw)
    gptq = mx.load(str(tmp_path / "gptq" / "model.safetensors"))
    dwq = mx.load(str(tmp_path / "dwq" / "model.safetensors"))
    assert gptq.keys() == dwq.keys()
    for name in gptq:
        assert mx.array_equal(gptq[name], dwq[name]).item(), name


def test_gptq_beats_round_to_nearest_on_held_out_text_of_the_trained_model(
    tmp_path, llama2_tokenizer
):
    from conftest import SHARED

    model = SHARED / "models" / "openelm-tiny-shakespeare"
    data = SHARED / "data" / "shakespeare"
    if not model.is_dir():
        pytest.skip(f"trained checkpoint not at {model} (../shared absent)")
    kl = {}
    for method in ("rtn", "gptq"):
        r = convert(model, tmp_path / method, quantize=True, bits=2, method=method,
                    calibration=data / "train.jsonl", calibration_samples=8,
                    tokenizer=llama2_tokenizer, quality=True)  # fmt: skip
        kl[method] = r.quality.kl_mean  # the probe reads train.jsonl's first 256 tokens
    assert kl["gptq"] < 0.9 * kl["rtn"], kl


def test_no_quantize_embedding_keeps_the_tied_head_float(tmp_path, tiny_spm, source):
    import mlx_lm

    folder, calib = source
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        convert(folder, out, quantize=True, method=method, group_size=32, calibration=calib,
                calibration_samples=6, quantize_embedding=False, tokenizer=tiny_spm)  # fmt: skip
        stored = mx.load(str(out / "model.safetensors"))
        assert "transformer.token_embeddings.scales" not in stored
        assert stored["transformer.token_embeddings.weight"].dtype == mx.float16
        assert "transformer.layers.0.attn.qkv_proj.scales" in stored
        model, _ = mlx_lm.load(str(out))
        assert type(model.transformer.token_embeddings).__name__ == "Embedding"


def test_bad_learned_options_are_refused_before_writing(tmp_path, tiny_spm, source):
    folder, calib = source
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("a few words")
    cases = [
        ({"method": "gptq"}, ConfigError, "needs --calibration FILE"),
        ({"method": "gptq", "calibration": tmp_path / "none.txt"}, DataError, "does not exist"),
        ({"method": "gptq", "calibration": tmp_path / "empty.txt"}, DataError, "is empty"),
        ({"method": "dwq", "calibration": tmp_path / "short.txt"}, DataError, "too few for 64"),
        ({"method": "dynamic", "calibration": calib}, ConfigError, "--bits-per-weight"),
        ({"method": "dynamic", "calibration": calib, "bits_per_weight": 2.0}, ConfigError,
         "below 2.5"),
        ({"method": "gptq", "calibration": calib, "group_size": 128, "calibration_samples": 6},
         ConfigError,
         "does not divide"),
        ({"method": "foo", "calibration": calib}, ConfigError, "--method must be one of"),
        ({"method": "rtn", "bits_per_weight": 4.0}, ConfigError, "dynamic only"),
    ]  # fmt: skip
    for options, error, words in cases:
        with pytest.raises(error, match=words):
            convert(folder, tmp_path / "q", quantize=True, tokenizer=tiny_spm, **options)
        assert not (tmp_path / "q").exists()


def test_cli_learned_conversion_reports_method_and_cost(tmp_path, tiny_spm, source):
    folder, calib = source
    base = ["convert", str(folder), str(tmp_path / "g"), "--tokenizer", str(tiny_spm), "-q",
            "--group-size", "32", "--calibration", str(calib),
            "--calibration-samples", "6"]  # fmt: skip
    ok = CliRunner().invoke(app, [*base, "--method", "gptq", "--bits", "3"])
    assert ok.exit_code == 0, ok.output
    assert "3-bit gptq g32 (4.00 bits/weight)" in ok.output
    assert f"tokens of {calib}: perplexity" in ok.output and "top-1 agreement" in ok.output
    bad = CliRunner().invoke(app, [*base[:2], str(tmp_path / "b"), *base[3:], "--method", "awq",
                                   "--calibration-samples", "999"])  # fmt: skip
    assert bad.exit_code == 1 and "too few for 999 samples" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "b").exists()


def test_non_finite_probe_logits_are_an_error_and_leave_no_folder(tmp_path, tiny_spm):
    from mlx_openelm.errors import QuantizationError

    cfg = tiny_config(vocab_size=400)
    weights = random_weights(cfg, seed=5)
    weights["transformer.layers.1.ffn.proj_2.weight"][0, :8] = 1e6  # beyond float16's 65504
    src = write_hf_safetensors(tmp_path / "src", cfg, weights)
    with pytest.raises(QuantizationError, match="NaN or infinity.*--dtype bfloat16"):
        convert(src, tmp_path / "q", quantize=True, group_size=32, dtype="float16",
                tokenizer=tiny_spm, quality=True, allow_nonfinite=True)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    ok = convert(src, tmp_path / "b", quantize=True, group_size=32, dtype="bfloat16",
                 tokenizer=tiny_spm, quality=True)  # fmt: skip
    assert np.isfinite(ok.quality.kl_mean)
