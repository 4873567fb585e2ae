"""Every field of Apple's ``OpenELMConfig`` is honoured exactly or refused by name.

Apple's code (``configuration_openelm.py`` / ``modeling_openelm.py``, and CoreNet's ``GPTConfig``):
- ``activation_fn_name`` picks transformers' ``ACT2FN[name]`` for the FFN (gated or not);
- ``ffn_with_glu`` false: ``proj_2(act(proj_1(x)))``;
- head counts are always derived from ``qkv_multipliers`` / ``num_gqa_groups``;
- a field left out takes ``OpenELMConfig``'s default (e.g. ``normalize_qk_projections=False``);
- ``share_input_output_layers: false`` uses ``lm_head``; ``save_pretrained`` also stores an
  unused ``transformer.classifier.weight``.
Numbers are checked against the independent float64 reference (``tests/openelm_ref.py``).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from convert_fixtures import write_hf_safetensors

from mlx_openelm.config import ACTIVATION_NAMES, ModelArgs
from mlx_openelm.convert import convert
from mlx_openelm.errors import ConfigError
from mlx_openelm.loading import load_model
from mlx_openelm.model import ACTIVATIONS, Model

import openelm_ref
from tiny import random_weights, rel_err, tiny_config

TOKENS = [1, 17, 250, 3, 99, 42, 42, 7, 311, 128, 5, 64, 200]


def logits(config: dict, weights: dict) -> np.ndarray:
    model = Model(ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return np.array(model(mx.array([TOKENS]))[0])


def test_every_supported_activation_has_a_kernel():
    assert set(ACTIVATIONS) == set(ACTIVATION_NAMES) == set(openelm_ref.ACTIVATIONS)


@pytest.mark.parametrize("glu", [True, False], ids=["glu", "plain-ffn"])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_activation_matches_float64_reference(activation, glu):
    cfg = tiny_config(activation_fn_name=activation, ffn_with_glu=glu)
    w = random_weights(cfg, seed=5)
    ref = openelm_ref.forward(w, TOKENS, cfg["head_dim"], activation=activation)
    assert rel_err(logits(cfg, w), ref) < 1e-4
    if activation not in ("swish", "silu"):  # the field changes the numbers: it is not ignored
        swish = openelm_ref.forward(w, TOKENS, cfg["head_dim"], activation="swish")
        assert rel_err(ref, swish) > 1e-3


@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_pytorch_tanh", "quick_gelu"])
def test_converted_hf_folder_keeps_its_activation(tmp_path, tiny_spm, activation):
    cfg = tiny_config(vocab_size=400, activation_fn_name=activation)
    w = random_weights(cfg, seed=6)
    src = write_hf_safetensors(tmp_path / "src", cfg, w)
    convert(src, tmp_path / "out", dtype="float32", tokenizer=tiny_spm)
    model, _ = load_model(tmp_path / "out")
    got = np.array(model(mx.array([[t % 400 for t in TOKENS]]))[0])
    ref = openelm_ref.forward(w, [t % 400 for t in TOKENS], cfg["head_dim"], activation=activation)
    assert rel_err(got, ref) < 1e-4


@pytest.mark.parametrize(
    "field, value",
    [
        ("activation_fn_name", "prelu"),  # a learned slope no checkpoint stores
        ("activation_fn_name", "swiglu"),
        ("normalization_layer_name", "layer_norm"),
    ],
)
def test_values_apple_code_would_compute_differently_are_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=rf"'{field}' is '{value}'.*supported: "):
        tiny_config(**{field: value})


def test_stored_head_counts_that_disagree_with_the_multipliers_are_refused():
    cfg = tiny_config()
    assert cfg["num_query_heads"] == [2, 4, 4, 4]
    with pytest.raises(ConfigError, match=r"'num_query_heads' is \[4, 4, 4, 4\].*\[2, 4, 4, 4\]"):
        ModelArgs.from_dict({**cfg, "num_query_heads": [4, 4, 4, 4]})
    without_multipliers = {k: v for k, v in cfg.items() if k != "qkv_multipliers"}
    lists_only = {**without_multipliers, "num_query_heads": [4, 4, 4, 4], "num_kv_heads": [2] * 4}
    assert ModelArgs.from_dict(lists_only).num_query_heads == [4, 4, 4, 4]  # mlx-lm style folder


def test_fields_left_out_take_apples_defaults():
    minimal = {"model_type": "openelm", "num_transformer_layers": 2, "model_dim": 64}
    args = ModelArgs.from_dict({**minimal, "head_dim": 16, "vocab_size": 100})
    # OpenELMConfig: qkv_multipliers=1.0, num_gqa_groups=1, ffn_multipliers=4.0, swish, no q/k
    # norm, untied head.
    assert args.num_query_heads == args.num_kv_heads == [4, 4]
    assert args.ffn_dims == [256, 256]
    assert args.activation_fn_name == "swish" and args.ffn_with_glu
    assert not args.normalize_qk_projections and not args.share_input_output_layers
    names = {k for k, _ in Model(args).parameters().items()}
    assert "lm_head" in names


def test_save_pretrained_untied_checkpoint_converts_with_lm_head(tmp_path, tiny_spm):
    cfg = tiny_config(vocab_size=400, share_input_output_layers=False)
    w = random_weights(cfg, seed=7)
    stored = {**w, "transformer.classifier.weight": np.zeros_like(w["lm_head.weight"])}
    src = write_hf_safetensors(tmp_path / "src", cfg, stored)
    convert(src, tmp_path / "out", dtype="float32", tokenizer=tiny_spm)
    model, _ = load_model(tmp_path / "out")
    ids = [t % 400 for t in TOKENS]
    got = np.array(model(mx.array([ids]))[0])
    assert rel_err(got, openelm_ref.forward(w, ids, cfg["head_dim"])) < 1e-4  # lm_head, not 0s
