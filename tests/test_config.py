from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlx_openelm.config import ModelArgs, make_divisible
from mlx_openelm.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared"


def test_270m_per_layer_values_match_apple():
    args = ModelArgs.from_preset("270M")
    assert args.num_query_heads == [12] * 5 + [16] * 7 + [20] * 4
    assert args.num_kv_heads == [3] * 5 + [4] * 7 + [5] * 4
    assert args.ffn_dims == [
        768,
        1024,
        1280,
        1536,
        1792,
        2048,
        2560,
        2816,
        3072,
        3328,
        3584,
        3840,
        4352,
        4608,
        4864,
        5120,
    ]


def test_1_1b_per_layer_values_match_apple():
    args = ModelArgs.from_preset("1_1B")
    assert args.num_query_heads == [16] * 3 + [20] * 7 + [24] * 8 + [28] * 6 + [32] * 4
    assert args.ffn_dims[13] == args.ffn_dims[14] == 4608
    assert args.num_kv_heads == [q // 4 for q in args.num_query_heads]


@pytest.mark.parametrize(
    ("size", "count"),
    [("270M", 271_527_168), ("450M", 457_179_136), ("1_1B", 1_079_891_456), ("3B", 3_036_647_424)],
)
def test_parameter_counts(size, count):
    assert ModelArgs.from_preset(size).num_parameters() == count


def test_parameter_count_matches_built_model():
    from mlx.utils import tree_flatten

    from mlx_openelm.model import Model

    from tiny import tiny_config

    args = ModelArgs.from_dict(tiny_config())
    n = sum(v.size for _, v in tree_flatten(Model(args).parameters()))
    assert n == args.num_parameters()


def test_make_divisible_never_rounds_down_more_than_10_percent():
    assert make_divisible(640, 256) == 768
    assert make_divisible(100, 64) == 128
    assert make_divisible(17, 8) == 16


def test_hf_config_round_trip_keeps_explicit_lists():
    cfg = ModelArgs.from_preset("450M").to_dict()
    again = ModelArgs.from_dict({**cfg, "unknown_key": 1})
    assert again.to_dict() == cfg
    assert cfg["model_type"] == "openelm"


def test_apple_style_config_json_with_lists():
    # The shape of apple/OpenELM-270M's config.json: lists given, multipliers too.
    cfg = {
        "model_type": "openelm",
        "num_transformer_layers": 16,
        "model_dim": 1280,
        "head_dim": 64,
        "vocab_size": 32000,
        "ffn_dim_divisor": 256,
        "num_gqa_groups": 4,
        "qkv_multipliers": [0.5, 1.0],
        "ffn_multipliers": [
            0.5,
            0.73,
            0.97,
            1.2,
            1.43,
            1.67,
            1.9,
            2.13,
            2.37,
            2.6,
            2.83,
            3.07,
            3.3,
            3.53,
            3.77,
            4.0,
        ],
        "num_query_heads": [12] * 5 + [16] * 7 + [20] * 4,
        "num_kv_heads": [3] * 5 + [4] * 7 + [5] * 4,
        "normalize_qk_projections": True,
        "share_input_output_layers": True,
        "torch_dtype": "float32",
        "auto_map": {"AutoConfig": "configuration_openelm.OpenELMConfig"},
    }
    args = ModelArgs.from_dict(cfg)
    assert args.ffn_dims == ModelArgs.from_preset("270M").ffn_dims
    assert args.num_parameters() == 271_527_168


def test_from_dict_does_not_mutate_input():
    cfg = {
        "model_type": "openelm",
        "num_transformer_layers": 2,
        "model_dim": 64,
        "head_dim": 16,
        "vocab_size": 100,
        "quantization": {"bits": 4, "group_size": 64},
    }
    before = repr(cfg)
    args = ModelArgs.from_dict(cfg)
    args.quantization["bits"] = 8
    assert repr(cfg) == before


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"model_dim": None}, "model_dim"),
        ({"num_query_heads": [4, 4, 4]}, "num_query_heads"),
        ({"num_kv_heads": [1, 1]}, "num_kv_heads"),
        ({"ffn_multipliers": [1.0, 2.0, 3.0]}, "ffn_multipliers"),
        ({"num_query_heads": [4, 4, 4, 4], "num_kv_heads": [3, 3, 3, 3]}, "num_query_heads"),
        # hostile and careless values: each a ConfigError naming the field, before any use
        ({"num_gqa_groups": 0}, "'num_gqa_groups' must be an integer in"),
        ({"ffn_dim_divisor": 0}, "'ffn_dim_divisor' must be an integer in"),
        ({"num_query_heads": ["4", 4, 4, 4]}, r"'num_query_heads\[0\]' must be an integer"),
        ({"qkv_multipliers": [0.5, float("nan")]}, r"'qkv_multipliers\[1\]' must be a finite"),
        ({"ffn_multipliers": "4"}, "'ffn_multipliers' must be a finite"),
        ({"model_dim": 2**31}, "'model_dim' must be an integer in"),
        ({"head_dim": 16.0}, "'head_dim' must be an integer"),
        ({"vocab_size": True}, "'vocab_size' must be an integer"),
        ({"num_transformer_layers": 10**6}, "'num_transformer_layers' must be an integer in"),
        ({"quantization": "yes"}, "'quantization' must be an object"),
        ({"quantization": {"bits": 5.5}}, "'quantization.bits' must be one of"),
        ({"quantization": {"lm_head": {"group_size": 7}}}, "'quantization.lm_head.group_size'"),
        ({"share_input_output_layers": "false"}, "'share_input_output_layers' must be true or"),
        ({"rms_norm_eps": -1}, "'rms_norm_eps' must be a finite positive"),
        ({"rope_freq_constant": float("inf")}, "'rope_freq_constant' must be a finite positive"),
        ({"eos_token_id": 100}, r"'eos_token_id' must be an integer in \[0, 99\]"),
    ],
)
def test_bad_configs_name_the_field(cfg, field):
    base = {
        "model_type": "openelm",
        "num_transformer_layers": 4,
        "model_dim": 64,
        "head_dim": 16,
        "vocab_size": 100,
        "num_gqa_groups": 2,
    }
    with pytest.raises(ConfigError, match=field):
        ModelArgs.from_dict({**base, **cfg})


def test_missing_required_fields_are_listed():
    with pytest.raises(ConfigError, match="model_dim, head_dim"):
        ModelArgs.from_dict(
            {"model_type": "openelm", "num_transformer_layers": 2, "vocab_size": 10}
        )


def test_unknown_preset():
    with pytest.raises(ConfigError, match="270M"):
        ModelArgs.from_preset("7B")


@pytest.mark.parametrize("size", ["270M", "450M", "1_1B", "3B"])
def test_corenet_yaml_sections(size):
    path = SHARED / "data" / "corenet-configs" / f"openelm_{size}.yaml"
    if not path.exists():
        pytest.skip(f"../shared corenet configs not available ({path})")
    section = yaml.safe_load(path.read_text())["model"]["language_modeling"]["general_gpt"]
    args = ModelArgs.from_corenet(section)
    assert section["vocab_size"] == 32128  # CoreNet pads the vocabulary…
    assert args.vocab_size == 32000  # …the MLX model keeps the 32000 tokenizer ids
    assert args.to_dict() == ModelArgs.from_preset(size).to_dict()


def test_corenet_explicit_fields():
    section = {
        "num_transformer_layers": 4,
        "model_dim": 64,
        "head_dim": 16,
        "num_gqa_groups": 2,
        "ffn_dim_divisor": 32,
        "vocab_size": 32128,
        "padding_index": 32000,
    }
    args = ModelArgs.from_corenet(section)
    assert args.vocab_size == 32000
    # Fields left out take CoreNet's GPTConfig defaults: qkv_multipliers=1.0 (uniform heads),
    # ffn_multipliers=4.0, no q/k norm, untied head.
    assert args.num_query_heads == [4, 4, 4, 4] and args.num_kv_heads == [2, 2, 2, 2]
    assert args.ffn_dims == [256] * 4
    assert not args.normalize_qk_projections and not args.share_input_output_layers
    scaled = ModelArgs.from_corenet({**section, "qkv_multipliers": [0.5, 1.0]})
    assert scaled.num_query_heads == [2, 4, 4, 4]  # 64·0.67 → 32 is < 90%: 64


def test_a_config_bigger_than_memory_is_refused_before_allocation(tmp_path, monkeypatch):
    import json

    from mlx_openelm import config_check
    from mlx_openelm.loading import load_model

    cfg = {"model_type": "openelm", "num_transformer_layers": 500, "model_dim": 2**16,
           "head_dim": 128, "vocab_size": 32000}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"parameters, at least .* GB of weights, more than"):
        load_model(tmp_path)  # fails before Model() builds 500 layers or any weight is read
    monkeypatch.setattr(config_check, "physical_memory", lambda: 10**6)
    small = {"model_type": "openelm", "num_transformer_layers": 2, "model_dim": 512,
             "head_dim": 64, "vocab_size": 32000}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(small))
    with pytest.raises(ConfigError, match="more than this machine's 0.0 GB"):
        load_model(tmp_path)
