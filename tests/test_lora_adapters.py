"""Adapter folders: mlx-lm interop, fuse equality (float and quantized), PEFT round trip checked
against the float64 reference, and adapters that do not fit the model."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_model_dir
from lora_helpers import make_adapters
from mlx.utils import tree_flatten

from mlx_openelm.errors import AdapterError, OutputExistsError
from mlx_openelm.folder import write_model_folder
from mlx_openelm.loading import load, load_model
from mlx_openelm.lora import AdapterSpec, export_peft, fuse, import_peft
from mlx_openelm.tokenizer import Tokenizer

import openelm_ref
from tiny import rel_err

TOKENS = [1, 17, 42, 99, 7, 250, 3, 64]


def as_float64(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v, np.float64) for k, v in mx.load(str(path)).items()}


def logits(model: nn.Module, tokens: list[int] = TOKENS) -> np.ndarray:
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory) -> Path:
    spec = AdapterSpec(rank=4, alpha=12.0, num_layers=3, targets=("qkv_proj", "proj_2"))
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("a") / "lora", spec)


def test_mlx_lm_loads_our_adapters(tiny_model_dir, lora_dir):
    import mlx_lm

    theirs, tokenizer = mlx_lm.load(str(tiny_model_dir), adapter_path=str(lora_dir))
    ours, _ = load(tiny_model_dir, adapter_path=lora_dir)
    base, _ = load(tiny_model_dir)
    assert rel_err(logits(theirs), logits(ours)) < 1e-6
    assert rel_err(logits(base), logits(ours)) > 1e-3  # the adapters matter
    text = mlx_lm.generate(theirs, tokenizer, "hello", max_tokens=4)
    assert isinstance(text, str)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_logits_equal_base_plus_adapter(tiny_model_dir, tmp_path, kind):
    adapter = make_adapters(
        tiny_model_dir, tmp_path / "a", AdapterSpec(fine_tune_type=kind, rank=4, alpha=8)
    )
    result = fuse(tiny_model_dir, adapter, tmp_path / "fused")
    assert result.warning is None and not result.quantized
    assert result.fused_layers == 16  # 4 layers × 4 targets
    with_adapter, _ = load(tiny_model_dir, adapter_path=adapter)
    fused, _ = load(tmp_path / "fused")
    assert all(not hasattr(m, "lora_a") for _, m in fused.named_modules())
    assert rel_err(logits(fused), logits(with_adapter)) < 1e-4
    assert (tmp_path / "fused" / "tokenizer.model").is_file()
    with pytest.raises(OutputExistsError):
        fuse(tiny_model_dir, adapter, tmp_path / "fused")


def test_fuse_full_fine_tune(tiny_model_dir, tmp_path):
    adapter = make_adapters(
        tiny_model_dir, tmp_path / "a", AdapterSpec(fine_tune_type="full", num_layers=1)
    )
    fuse(tiny_model_dir, adapter, tmp_path / "fused")
    with_adapter, _ = load(tiny_model_dir, adapter_path=adapter)
    assert rel_err(logits(load(tmp_path / "fused")[0]), logits(with_adapter)) < 1e-6


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory) -> Path:
    model, _ = load(tiny_model_dir)
    nn.quantize(model, group_size=32, bits=4)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4}
    out = tmp_path_factory.mktemp("q") / "q4"
    write_model_folder(
        out, config, tree_flatten(model.parameters()), Tokenizer.from_folder(tiny_model_dir)
    )
    return out


def test_fuse_onto_quantized_base_warns_and_dequantize_is_exact(quantized_dir, tmp_path):
    adapter = make_adapters(quantized_dir, tmp_path / "a", AdapterSpec(rank=4, alpha=8))
    with_adapter, _ = load(quantized_dir, adapter_path=adapter)
    result = fuse(quantized_dir, adapter, tmp_path / "requant")
    assert result.quantized and "re-quantized to 4 bits" in result.warning
    assert "--dequantize" in result.warning and "KiB instead of" in result.warning
    requant, config = load_model(tmp_path / "requant")
    assert config["quantization"]["bits"] == 4
    drift = rel_err(logits(requant), logits(with_adapter))
    assert 1e-5 < drift < 0.5  # rounding moved the outputs, as the warning says
    assert "% (max relative) on a probe" in result.warning
    exact = fuse(quantized_dir, adapter, tmp_path / "float", dequantize=True)
    assert exact.warning is None and not exact.quantized
    dequantized, config = load_model(tmp_path / "float")
    assert "quantization" not in config
    assert rel_err(logits(dequantized), logits(with_adapter)) < 1e-4


def test_peft_round_trip_and_semantics(tiny_model_dir, lora_dir, tmp_path):
    peft_dir = export_peft(lora_dir, tmp_path / "peft", base_model="apple/OpenELM-270M")
    peft_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    r, alpha = peft_cfg["r"], peft_cfg["lora_alpha"]
    assert (r, alpha, peft_cfg["peft_type"]) == (4, 12, "LORA")
    assert peft_cfg["target_modules"] == ["proj_2", "qkv_proj"]
    assert peft_cfg["layers_to_transform"] == [1, 2, 3]
    peft = as_float64(peft_dir / "adapter_model.safetensors")
    a = peft["base_model.model.transformer.layers.1.attn.qkv_proj.lora_A.weight"]
    b = peft["base_model.model.transformer.layers.1.attn.qkv_proj.lora_B.weight"]
    assert a.shape[0] == r and b.shape[1] == r  # (r, in) and (out, r)

    # PEFT's rule, applied in float64 to the base weights, must give our adapted logits.
    weights = as_float64(tiny_model_dir / "model.safetensors")
    for name, lora_a in peft.items():
        if name.endswith("lora_A.weight"):
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora_b = peft[name.replace("lora_A", "lora_B")]
            weights[module + ".weight"] = weights[module + ".weight"] + alpha / r * lora_b @ lora_a
    ref = openelm_ref.forward(weights, TOKENS, head_dim=16)
    ours, _ = load(tiny_model_dir, adapter_path=lora_dir)
    assert rel_err(logits(ours), ref) < 1e-4

    back = import_peft(peft_dir, tiny_model_dir, tmp_path / "back")
    original, restored = (
        mx.load(str(lora_dir / "adapters.safetensors")),
        mx.load(str(back / "adapters.safetensors")),
    )
    assert set(original) == set(restored)
    assert all(mx.array_equal(original[k], restored[k]).item() for k in original)
    cfg_a = json.loads((lora_dir / "adapter_config.json").read_text())
    cfg_b = json.loads((back / "adapter_config.json").read_text())
    assert cfg_b["lora_parameters"] == cfg_a["lora_parameters"]
    assert cfg_b["num_layers"] == cfg_a["num_layers"] == 3
    imported, _ = load(tiny_model_dir, adapter_path=back)
    assert rel_err(logits(imported), logits(ours)) < 1e-6


def test_peft_dora_round_trip(tiny_model_dir, tmp_path):
    dora = make_adapters(
        tiny_model_dir, tmp_path / "d", AdapterSpec(fine_tune_type="dora", rank=2, alpha=2)
    )
    peft_dir = export_peft(dora, tmp_path / "peft")
    assert json.loads((peft_dir / "adapter_config.json").read_text())["use_dora"] is True
    names = mx.load(str(peft_dir / "adapter_model.safetensors"))
    assert "base_model.model.transformer.layers.0.ffn.proj_1.lora_magnitude_vector" in names
    back = import_peft(peft_dir, tiny_model_dir, tmp_path / "back")
    a, b = load(tiny_model_dir, adapter_path=dora)[0], load(tiny_model_dir, adapter_path=back)[0]
    assert rel_err(logits(b), logits(a)) < 1e-6


def test_peft_rejects_what_it_cannot_map(tiny_model_dir, lora_dir, tmp_path):
    full = make_adapters(
        tiny_model_dir, tmp_path / "f", AdapterSpec(fine_tune_type="full", num_layers=1)
    )
    with pytest.raises(AdapterError, match="full fine-tune"):
        export_peft(full, tmp_path / "x")
    peft_dir = export_peft(lora_dir, tmp_path / "peft")
    other = make_model_dir(tmp_path / "wide", tiny_model_dir / "tokenizer.model", model_dim=96)
    with pytest.raises(AdapterError, match=r"layers\.1\.attn\.qkv_proj\.lora_a has shape \(64"):
        import_peft(peft_dir, other, tmp_path / "y")
    assert not (tmp_path / "y").exists()
    deep = make_model_dir(tmp_path / "deep", tiny_model_dir / "tokenizer.model",
                          num_transformer_layers=6)  # fmt: skip
    with pytest.raises(AdapterError, match="last N"):
        import_peft(peft_dir, deep, tmp_path / "z")


def test_adapters_for_another_model_shape_name_the_tensor(tiny_model_dir, lora_dir, tmp_path):
    other = make_model_dir(tmp_path / "wide", tiny_model_dir / "tokenizer.model", model_dim=96)
    with pytest.raises(AdapterError) as e:
        load(other, adapter_path=lora_dir)
    assert "transformer.layers.1.attn.qkv_proj.lora_a" in str(e.value)
    assert "\n" not in str(e.value)  # one line for the CLI


def test_unreadable_adapter_folders_are_adapter_errors(tiny_model_dir, lora_dir, tmp_path):
    import shutil

    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load(tiny_model_dir, adapter_path=tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(lora_dir, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    del config["lora_parameters"]["scale"]
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="lora_parameters needs 'rank' and 'scale'"):
        load(tiny_model_dir, adapter_path=broken)
    for field, value in (("rank", "8"), ("scale", float("nan")), ("dropout", 2.0)):
        config["lora_parameters"] = {"rank": 8, "scale": 2.0, field: value}
        (broken / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(AdapterError, match=f"'{field}' has the impossible value"):
            load(tiny_model_dir, adapter_path=broken)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: malformed JSON"):
        load(tiny_model_dir, adapter_path=broken)


def test_adapters_holding_nan_are_refused_before_anything_is_written(
    tiny_model_dir, lora_dir, tmp_path
):
    import shutil

    broken = tmp_path / "nan"
    shutil.copytree(lora_dir, broken)
    weights = mx.load(str(broken / "adapters.safetensors"))
    name = sorted(weights)[1]
    poisoned = np.array(weights[name])
    poisoned.flat[0] = np.nan
    weights[name] = mx.array(poisoned)
    mx.save_safetensors(str(broken / "adapters.safetensors"), weights)
    with pytest.raises(AdapterError) as e:
        load(tiny_model_dir, adapter_path=broken)
    assert f"1 tensor(s) hold NaN or infinite values ({name})" in str(e.value)
    assert "\n" not in str(e.value)
    out = tmp_path / "fused"
    with pytest.raises(AdapterError, match="NaN"):
        fuse(tiny_model_dir, broken, out)
    assert not out.exists() and list(tmp_path.iterdir()) == [broken]
    load(tiny_model_dir, adapter_path=lora_dir)  # the untouched adapters still load
