"""Model numerics: fp32 logits against the independent float64 reference, KV-cache decoding,
half precision, and equality with mlx-lm's own ``openelm`` model on the same weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_openelm import fastmath
from mlx_openelm.config import ModelArgs
from mlx_openelm.model import Model

import openelm_ref
from tiny import random_weights, rel_err, tiny_config

TOKENS = [1, 17, 250, 3, 99, 42, 42, 7, 311, 128, 5, 64, 200]


def build(config: dict, weights: dict, dtype=mx.float32) -> Model:
    model = Model(ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v).astype(dtype)) for k, v in weights.items()])
    mx.eval(model.parameters())
    return model


def logits_of(model: Model, tokens=TOKENS) -> np.ndarray:
    out = model(mx.array([tokens]))
    return np.array(out[0].astype(mx.float32))


@pytest.fixture(autouse=True, params=["fast-exp", "mlx-exp"])
def math_path(request, monkeypatch):
    """Every test twice: the CPU polynomial exp forced on (even for these tiny arrays), and off."""
    if request.param == "fast-exp":
        monkeypatch.setattr(fastmath, "_MIN_SIZE", 0)
    else:
        monkeypatch.setenv("MLX_OPENELM_FAST_MATH", "0")
    return request.param


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    w = random_weights(cfg, seed=1)
    ref = openelm_ref.forward(w, TOKENS, head_dim=cfg["head_dim"])
    return cfg, w, ref


def test_fp32_logits_match_float64_reference(tiny):
    cfg, w, ref = tiny
    assert ModelArgs.from_dict(cfg).num_query_heads == [2, 4, 4, 4]  # layer-wise scaling is on
    assert rel_err(logits_of(build(cfg, w)), ref) < 1e-4


@pytest.mark.parametrize(
    "overrides",
    [
        {"share_input_output_layers": False},
        {"normalize_qk_projections": False},
        {"num_gqa_groups": 1},
        {"rope_freq_constant": 500000},
    ],
)
def test_variants_match_reference(overrides):
    cfg = tiny_config(**overrides)
    w = random_weights(cfg, seed=2)
    ref = openelm_ref.forward(w, TOKENS, cfg["head_dim"], rope_base=cfg["rope_freq_constant"])
    assert rel_err(logits_of(build(cfg, w)), ref) < 1e-4


def test_270m_shape_layer_matches_reference():
    # Two layers of the real 270M width/heads (12 q heads, 3 kv heads, head_dim 64).
    cfg = ModelArgs.from_preset("270M", num_transformer_layers=2, vocab_size=512).to_dict()
    w = random_weights(cfg, seed=3)
    ref = openelm_ref.forward(w, TOKENS, head_dim=64)
    assert rel_err(logits_of(build(cfg, w)), ref) < 1e-4


def _mutated(w: dict, what: str) -> dict:
    w = dict(w)
    for k in list(w):
        if what == "swap_gate_up" and k.endswith("proj_1.weight"):
            gate, up = np.split(w[k], 2, axis=0)
            w[k] = np.concatenate([up, gate], axis=0)
        if what == "drop_qk_norm" and (k.endswith("q_norm.weight") or k.endswith("k_norm.weight")):
            w[k] = np.ones_like(w[k])
    return w


@pytest.mark.parametrize("what", ["swap_gate_up", "drop_qk_norm"])
def test_reference_parity_detects_architecture_mistakes(tiny, what):
    cfg, w, ref = tiny
    assert rel_err(logits_of(build(cfg, _mutated(w, what))), ref) > 1e-2


def test_reference_parity_detects_traditional_rope(tiny, monkeypatch):
    cfg, w, ref = tiny
    from mlx_openelm import model as model_mod

    real_rope = mx.fast.rope

    def traditional(x, dims, *, traditional, base, scale, offset):
        return real_rope(x, dims, traditional=True, base=base, scale=scale, offset=offset)

    monkeypatch.setattr(model_mod.mx.fast, "rope", traditional)
    assert rel_err(logits_of(build(cfg, w)), ref) > 1e-2


def test_incremental_decoding_with_cache_equals_full_forward(tiny):
    cfg, w, _ = tiny
    model = build(cfg, w)
    full = logits_of(model)
    cache = make_prompt_cache(model)
    steps = [np.array(model(mx.array([TOKENS[:5]]), cache=cache)[0])]
    for t in TOKENS[5:]:
        steps.append(np.array(model(mx.array([[t]]), cache=cache)[0]))
    assert rel_err(np.concatenate(steps, axis=0), full) < 1e-5


def test_batched_forward_equals_single(tiny):
    cfg, w, _ = tiny
    model = build(cfg, w)
    other = list(reversed(TOKENS))
    both = np.array(model(mx.array([TOKENS, other])))
    assert rel_err(both[0], logits_of(model, TOKENS)) < 1e-5
    assert rel_err(both[1], logits_of(model, other)) < 1e-5


@pytest.mark.parametrize(("dtype", "tol"), [(mx.float16, 2e-2), (mx.bfloat16, 5e-2)])
def test_half_precision_runs_and_stays_close(tiny, dtype, tol):
    cfg, w, ref = tiny
    model = build(cfg, w, dtype)
    out = model(mx.array([TOKENS]))
    assert out.dtype == dtype
    got = np.array(out[0].astype(mx.float32))
    assert np.isfinite(got).all()
    assert rel_err(got, ref) < tol
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_equals_mlx_lm_openelm_on_same_weights(tiny):
    from mlx_lm.models import openelm as mlx_lm_openelm

    cfg, w, _ = tiny
    theirs = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(cfg))
    theirs.load_weights([(k, mx.array(v)) for k, v in w.items()])
    ours = build(cfg, w)
    np.testing.assert_allclose(
        logits_of(ours), np.array(theirs(mx.array([TOKENS]))[0]), rtol=1e-5, atol=1e-5
    )
