"""Round trips through the converter from every source format, against the float64 reference.

Each test writes a random checkpoint in one format, converts it (float32 output, so the weights
are exact), loads the folder and compares logits with ``openelm_ref.forward`` on the same weights.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from convert_fixtures import (
    corenet_state,
    model_logits,
    reference_logits,
    write_corenet_pt,
    write_corenet_yaml,
    write_hf_bin,
    write_hf_safetensors,
)

from mlx_openelm.config import ModelArgs
from mlx_openelm.convert import convert
from mlx_openelm.hub import file_sha256

from tiny import random_weights, rel_err, tiny_config

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    """A tiny config (vocab 400, the tiny tokenizer's) and its random weights."""
    cfg = tiny_config(vocab_size=400)
    return cfg, random_weights(cfg, seed=3)


@pytest.fixture(scope="module")
def tiny32k():
    """A tiny config with the real 32000-token vocabulary (CoreNet pads it to 32128)."""
    cfg = tiny_config(vocab_size=32000)
    return cfg, random_weights(cfg, seed=4)


def _check(folder, cfg, weights):
    assert rel_err(model_logits(folder, cfg), reference_logits(weights, cfg)) <= TOL


@pytest.mark.parametrize(
    "writer, shards",
    [(write_hf_safetensors, 1), (write_hf_safetensors, 3), (write_hf_bin, 1), (write_hf_bin, 3)],
    ids=["safetensors", "safetensors-sharded", "bin", "bin-sharded"],
)
def test_hf_folder_round_trip(tmp_path, tiny_spm, tiny, writer, shards):
    cfg, weights = tiny
    src = writer(tmp_path / "src", cfg, weights, shards=shards)
    result = convert(src, tmp_path / "out", dtype="float32", tokenizer=tiny_spm)
    _check(tmp_path / "out", cfg, weights)
    assert result.parameters == ModelArgs.from_dict(cfg).num_parameters()
    files = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.bin"))
    assert result.source["files"] == [{"file": f.name, "sha256": file_sha256(f)} for f in files]
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["source"] == result.source
    assert written["converted_by"]["tool"] == "mlx-openelm"
    assert written["converted_by"]["dtype"] == "float32"


def test_bfloat16_safetensors_are_read_bit_exactly(tmp_path, tiny_spm, tiny):
    cfg, weights = tiny
    src = write_hf_safetensors(tmp_path / "src", cfg, weights, dtype=mx.bfloat16)
    convert(src, tmp_path / "out", dtype="float32", tokenizer=tiny_spm)
    rounded = {
        k: np.array(mx.array(v).astype(mx.bfloat16).astype(mx.float32)) for k, v in weights.items()
    }
    _check(tmp_path / "out", cfg, rounded)


def test_default_dtype_is_float16_and_loads(tmp_path, tiny_spm, tiny):
    cfg, weights = tiny
    src = write_hf_safetensors(tmp_path / "src", cfg, weights)
    result = convert(src, tmp_path / "out", tokenizer=tiny_spm)
    assert result.dtype == "float16"
    from mlx_openelm.folder import safetensors_header

    header = safetensors_header(tmp_path / "out" / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    assert rel_err(model_logits(tmp_path / "out", cfg), reference_logits(weights, cfg)) < 2e-2


@pytest.mark.parametrize("wrapped", [False, True], ids=["state-dict", "training-checkpoint"])
def test_corenet_round_trip_drops_padding_rows(tmp_path, tiny_spm, tiny32k, wrapped):
    cfg, weights = tiny32k
    pt = write_corenet_pt(tmp_path / "checkpoint_last.pt", corenet_state(weights), wrapped)
    yml = write_corenet_yaml(tmp_path / "run.yaml", cfg)
    result = convert(pt, tmp_path / "out", config_yaml=yml, dtype="float32", tokenizer=tiny_spm)
    assert result.source["format"] == "corenet"
    assert result.source["files"] == [{"file": pt.name, "sha256": file_sha256(pt)}]
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["vocab_size"] == 32000
    _check(tmp_path / "out", cfg, weights)


def test_averaging_corenet_checkpoints(tmp_path, tiny_spm, tiny32k):
    cfg, _ = tiny32k
    runs = [random_weights(cfg, seed=s) for s in (10, 11, 12)]
    pts = [
        write_corenet_pt(tmp_path / f"checkpoint_{i}.pt", corenet_state(w, seed=i), wrapped=i == 1)
        for i, w in enumerate(runs)
    ]
    yml = write_corenet_yaml(tmp_path / "run.yaml", cfg)
    result = convert(pts, tmp_path / "out", config_yaml=yml, dtype="float32", tokenizer=tiny_spm)
    mean = {k: np.mean([w[k].astype(np.float64) for w in runs], axis=0) for k in runs[0]}
    _check(tmp_path / "out", cfg, mean)
    assert result.source["averaged"] == 3
    assert [c["files"][0]["file"] for c in result.source["checkpoints"]] == [p.name for p in pts]


def test_averaging_hf_folders(tmp_path, tiny_spm, tiny):
    cfg, _ = tiny
    runs = [random_weights(cfg, seed=s) for s in (20, 21)]
    srcs = [write_hf_safetensors(tmp_path / f"run{i}", cfg, w) for i, w in enumerate(runs)]
    convert(srcs, tmp_path / "out", dtype="float32", tokenizer=tiny_spm)
    mean = {k: (runs[0][k].astype(np.float64) + runs[1][k]) / 2 for k in runs[0]}
    _check(tmp_path / "out", cfg, mean)


def test_corenet_size_preset_and_real_yamls(shared_corenet_configs):
    from mlx_openelm.convert.corenet import load_corenet_config

    nominal = {"270M": 270e6, "450M": 450e6, "1_1B": 1.1e9, "3B": 3e9}
    for size, params in nominal.items():
        name = "openelm_" + size + ".yaml"
        from_yaml = load_corenet_config(shared_corenet_configs / name)
        assert from_yaml.to_dict() == ModelArgs.from_preset(size).to_dict()
        assert from_yaml.vocab_size == 32000
        assert abs(from_yaml.num_parameters() / params - 1) < 0.05
        lora = load_corenet_config(shared_corenet_configs / ("openelm_lora_" + size + ".yaml"))
        assert lora.to_dict() == from_yaml.to_dict()


@pytest.fixture
def shared_corenet_configs():
    from conftest import SHARED

    folder = SHARED / "data" / "corenet-configs"
    if not folder.is_dir():
        pytest.skip(f"CoreNet YAMLs not at {folder} (../shared absent)")
    return folder


def test_hf_file_inside_folder_means_the_folder(tmp_path, tiny_spm, tiny):
    cfg, weights = tiny
    src = write_hf_safetensors(tmp_path / "src", cfg, weights)
    convert(src / "model.safetensors", tmp_path / "out", dtype="float32", tokenizer=tiny_spm)
    _check(tmp_path / "out", cfg, weights)


def test_instruct_name_gets_zephyr_template_and_force_replaces(tmp_path, tiny_spm, tiny):
    from mlx_openelm.tokenizer import ZEPHYR_CHAT_TEMPLATE, Tokenizer

    cfg, weights = tiny
    src = write_hf_safetensors(tmp_path / "OpenELM-tiny-Instruct", cfg, weights)
    convert(src, tmp_path / "out", tokenizer=tiny_spm)
    assert Tokenizer.from_folder(tmp_path / "out").chat_template == ZEPHYR_CHAT_TEMPLATE
    convert(src, tmp_path / "out", tokenizer=tiny_spm, chat_template="none", force=True)
    assert Tokenizer.from_folder(tmp_path / "out").chat_template is None
    base = write_hf_safetensors(tmp_path / "OpenELM-tiny", cfg, weights)
    convert(base, tmp_path / "out2", tokenizer=tiny_spm)
    assert Tokenizer.from_folder(tmp_path / "out2").chat_template is None
    convert(base, tmp_path / "out3", tokenizer=tiny_spm, chat_template="zephyr")
    assert Tokenizer.from_folder(tmp_path / "out3").chat_template == ZEPHYR_CHAT_TEMPLATE
    assert not list(tmp_path.glob(".*tmp*")) and not list(tmp_path.glob(".*old*"))


def test_progress_reports_every_tensor_and_byte(tmp_path, tiny_spm, tiny):
    cfg, weights = tiny
    src = write_hf_safetensors(tmp_path / "src", cfg, weights)
    events = []
    convert(src, tmp_path / "out", dtype="float32", tokenizer=tiny_spm, on_progress=events.append)
    converting = [e for e in events if e.phase == "convert"]
    assert len(converting) == len(events)
    assert [e.tensors_done for e in converting] == list(range(1, len(weights) + 1))
    last = converting[-1]
    assert last.bytes_done == last.bytes_total == sum(w.nbytes for w in weights.values())
    assert {e.name for e in converting} == set(weights)


def test_corenet_names_in_a_safetensors_file(tmp_path, tiny_spm, tiny32k):
    # Apple's MLX example writes CoreNet-named weights as weights.safetensors.
    cfg, weights = tiny32k
    st = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(st), {k: mx.array(v) for k, v in corenet_state(weights).items()})
    yml = write_corenet_yaml(tmp_path / "run.yaml", cfg)
    convert(st, tmp_path / "out", config_yaml=yml, dtype="float32", tokenizer=tiny_spm)
    _check(tmp_path / "out", cfg, weights)


def test_default_dtype_is_bfloat16_only_for_3b():
    from mlx_openelm.convert import _default_dtype

    assert [_default_dtype(ModelArgs.from_preset(s)) for s in ("270M", "1_1B", "3B")] == [
        "float16",
        "float16",
        "bfloat16",
    ]
