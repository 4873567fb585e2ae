"""Model folders: the streaming writer, atomicity, sharding, quantized loading, bad folders,
and interop with mlx-lm's loader."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_openelm.errors import ModelNotFoundError, OutputExistsError, WeightsError
from mlx_openelm.folder import atomic_output, write_model_folder
from mlx_openelm.loading import load_model

import openelm_ref
from tiny import random_weights, rel_err, tiny_config

TOKENS = [1, 5, 9, 200, 33, 7, 7, 100]


def _write(path, cfg, w, **kw):
    return write_model_folder(path, cfg, ((k, mx.array(v)) for k, v in w.items()), **kw)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, random_weights(cfg, seed=4)


def _logits(model, tokens=TOKENS):
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def test_written_folder_loads_and_matches_reference(tmp_path, tiny):
    cfg, w = tiny
    totals = _write(tmp_path / "m", cfg, w)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert totals["total_parameters"] == sum(v.size for v in w.values())
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folder left behind
    model, config = load_model(tmp_path / "m")
    assert config["model_type"] == "openelm"
    ref = openelm_ref.forward(w, TOKENS, cfg["head_dim"])
    assert rel_err(_logits(model), ref) < 1e-4
    # The safetensors file is standard: mx.load reads back the exact tensors.
    back = mx.load(str(tmp_path / "m" / "model.safetensors"))
    for k, v in w.items():
        np.testing.assert_array_equal(np.array(back[k]), v)


def test_bfloat16_tensors_round_trip(tmp_path, tiny):
    cfg, w = tiny
    write_model_folder(
        tmp_path / "m", cfg, ((k, mx.array(v).astype(mx.bfloat16)) for k, v in w.items())
    )
    back = mx.load(str(tmp_path / "m" / "model.safetensors"))
    k = "transformer.layers.0.attn.qkv_proj.weight"
    assert back[k].dtype == mx.bfloat16
    assert mx.array_equal(back[k], mx.array(w[k]).astype(mx.bfloat16)).item()


def test_sharded_folder_has_index_and_loads(tmp_path, tiny):
    cfg, w = tiny
    totals = _write(tmp_path / "m", cfg, w, max_shard_bytes=200_000)
    assert len(totals["files"]) > 1
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(w)
    assert set(index["weight_map"].values()) == set(totals["files"])
    model, _ = load_model(tmp_path / "m")
    assert rel_err(_logits(model), openelm_ref.forward(w, TOKENS, cfg["head_dim"])) < 1e-4


def test_existing_output_is_refused_unless_forced(tmp_path, tiny):
    cfg, w = tiny
    _write(tmp_path / "m", cfg, w)
    with pytest.raises(OutputExistsError, match="--force"):
        _write(tmp_path / "m", cfg, w)
    w2 = random_weights(cfg, seed=5)
    _write(tmp_path / "m", cfg, w2, force=True)
    model, _ = load_model(tmp_path / "m")
    assert rel_err(_logits(model), openelm_ref.forward(w2, TOKENS, cfg["head_dim"])) < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_failure_mid_write_leaves_nothing(tmp_path, tiny):
    cfg, w = tiny

    def tensors():
        yield "transformer.norm.weight", mx.array(w["transformer.norm.weight"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_model_folder(tmp_path / "m", cfg, tensors())
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_keeps_old_folder_on_failure(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("old")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "openelm"}')
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "m", force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert (tmp_path / "m" / "keep.txt").read_text() == "old"


def test_quantized_folder_loads_as_quantized_modules(tmp_path, tiny):
    cfg, w = tiny
    _write(tmp_path / "f", cfg, w)
    model, _ = load_model(tmp_path / "f")
    nn.quantize(model, group_size=32, bits=8)
    from mlx.utils import tree_flatten

    qcfg = {**cfg, "quantization": {"group_size": 32, "bits": 8}}
    write_model_folder(tmp_path / "q", qcfg, iter(tree_flatten(model.parameters())))
    qmodel, _ = load_model(tmp_path / "q", dequantize=False)
    assert isinstance(qmodel.layers[0].attn.qkv_proj, nn.QuantizedLinear)
    assert isinstance(qmodel.transformer.token_embeddings, nn.QuantizedEmbedding)
    ref = openelm_ref.forward(w, TOKENS, cfg["head_dim"])
    got = _logits(qmodel)
    assert rel_err(got, ref) < 5e-2  # 8-bit stays close to the float64 reference
    assert rel_err(got, _logits(model)) < 1e-5  # and equals the in-memory quantized model
    assert not qmodel.execution.dequantized
    # On the CPU backend the default expands the same values to float32 (see test_runtime).
    fmodel, _ = load_model(tmp_path / "q")
    assert fmodel.execution.dequantized and type(fmodel.layers[0].attn.qkv_proj) is nn.Linear
    assert rel_err(_logits(fmodel), got) < 1e-5


def test_missing_extra_and_misshaped_tensors_are_all_listed(tmp_path, tiny):
    cfg, w = tiny
    bad = dict(w)
    del bad["transformer.layers.0.attn.q_norm.weight"]
    del bad["transformer.layers.3.ffn.proj_2.weight"]
    bad["transformer.layers.9.attn.qkv_proj.weight"] = np.zeros((4, 4), np.float32)
    bad["transformer.norm.weight"] = np.ones(3, np.float32)
    _write(tmp_path / "m", cfg, bad)
    with pytest.raises(WeightsError) as e:
        load_model(tmp_path / "m")
    msg = str(e.value)
    assert "missing 2 tensor(s)" in msg and "layers.0.attn.q_norm.weight" in msg
    assert "layers.3.ffn.proj_2.weight" in msg
    assert "unexpected 1 tensor(s): transformer.layers.9.attn.qkv_proj.weight" in msg
    assert "transformer.norm.weight (expected (64,), got (3,))" in msg


def test_folder_without_config_or_weights(tmp_path, tiny):
    cfg, _ = tiny
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="no model\\*.safetensors"):
        load_model(tmp_path)


def test_corrupt_safetensors_names_the_file(tmp_path, tiny):
    cfg, w = tiny
    _write(tmp_path / "m", cfg, w)
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_model(tmp_path / "m")


def test_unknown_model_reference():
    from mlx_openelm.loading import resolve_model_path

    with pytest.raises(ModelNotFoundError, match="neither a local folder nor a hub repo id"):
        resolve_model_path("./no/such/folder")


@pytest.mark.parametrize("reserve", [None, 16])
def test_safetensors_readable_by_other_readers(tmp_path, tiny, monkeypatch, reserve):
    # The header is written into reserved room in front of the data (or, when it does not fit,
    # the data is moved behind it); either way standard readers must agree on every tensor.
    from safetensors import safe_open

    import mlx_openelm.folder as folder_mod

    if reserve is not None:
        monkeypatch.setattr(folder_mod, "_HEADER_RESERVE", reserve)
    cfg, w = tiny
    _write(tmp_path / "m", cfg, w)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="np") as f:
        assert set(f.keys()) == set(w)
        for k in w:
            np.testing.assert_array_equal(f.get_tensor(k), w[k])
