"""Logits processors against independent NumPy computations, their option checks, and the
decoding defaults a model brings (generation_config.json, Apple's for Instruct)."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm.decoding_defaults import from_generation_config, with_model_defaults
from mlx_openelm.errors import GenerationError
from mlx_openelm.generate_options import GenerationOptions
from mlx_openelm.penalties import make_processors, with_history

V = 50
rng = np.random.default_rng(0)
LOGITS = rng.standard_normal(V).astype(np.float32) * 3  # positive and negative logits
HISTORY = rng.integers(0, 20, 60).tolist()  # repeats, so "distinct" and counts matter


def apply(history: list[int], **options) -> np.ndarray:
    processors = make_processors(**options)
    logits = mx.array(LOGITS)[None]
    for p in processors:
        logits = p(mx.array(history, dtype=mx.uint32), logits)
    return np.array(logits[0])


def hf_repetition(logits: np.ndarray, ids: list[int], penalty: float) -> np.ndarray:
    out = logits.astype(np.float64).copy()
    for i in set(ids):
        out[i] = out[i] / penalty if out[i] > 0 else out[i] * penalty
    return out


def test_context_scope_is_hugging_faces_penalty_over_every_token():
    got = apply(HISTORY, start=0, repetition_penalty=1.3, repetition_scope="context")
    np.testing.assert_allclose(got, hf_repetition(LOGITS, HISTORY, 1.3), rtol=1e-6)
    assert not np.allclose(got, apply(HISTORY, start=0, repetition_penalty=1.3))  # window differs


def test_window_scope_is_mlx_lms_last_n_tokens():
    got = apply(HISTORY, start=0, repetition_penalty=1.5, repetition_context_size=7)
    np.testing.assert_allclose(got, hf_repetition(LOGITS, HISTORY[-7:], 1.5), rtol=1e-6)


def test_openai_penalties_count_only_the_completion():
    start = 40
    got = apply(HISTORY, start=start, presence_penalty=0.5, frequency_penalty=0.25)
    counts = np.bincount(HISTORY[start:], minlength=V).astype(np.float64)
    want = LOGITS - 0.25 * counts - 0.5 * (counts > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(apply(HISTORY[:start], start=start, presence_penalty=1.0), LOGITS)


def test_logit_bias_then_penalties_in_order():
    bias = {3: 5.0, 7: -100.0, 49: 0.5}
    got = apply(HISTORY, start=50, logit_bias=bias, repetition_penalty=1.2,
                repetition_scope="context", frequency_penalty=0.1)  # fmt: skip
    want = LOGITS.astype(np.float64).copy()
    for i, b in bias.items():
        want[i] += b
    want = hf_repetition(want, HISTORY, 1.2)
    want -= 0.1 * np.bincount(HISTORY[50:], minlength=V)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_with_history_prepends_the_cached_tokens():
    [p] = with_history(make_processors(start=0, repetition_penalty=2.0, repetition_scope="context"),
                       HISTORY[:30])  # fmt: skip
    got = np.array(p(mx.array(HISTORY[30:], dtype=mx.uint32), mx.array(LOGITS)[None])[0])
    np.testing.assert_allclose(got, hf_repetition(LOGITS, HISTORY, 2.0), rtol=1e-6)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"prompt_lookup_num_tokens": 0}, "--prompt-lookup"),
        ({"prompt_lookup_num_tokens": 1000}, "from 1 to 64"),
        ({"prompt_lookup_max_ngram": 0}, "--prompt-lookup-ngram"),
        ({"prompt_lookup_min_ngram": 0}, "--prompt-lookup-min-ngram"),
        ({"prompt_lookup_min_ngram": 3, "prompt_lookup_max_ngram": 2}, "3 > 2"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty"),
        ({"repetition_penalty": -1.2}, "> 0"),
        ({"repetition_scope": "all"}, "'context' or 'window'"),
        ({"presence_penalty": 3.0}, "in [-2, 2]"),
        ({"frequency_penalty": float("nan")}, "--frequency-penalty"),
        ({"logit_bias": {-1: 1.0}}, "outside the vocabulary"),
        ({"logit_bias": {5: 101.0}}, "[-100, 100]"),
        ({"prompt_lookup_num_tokens": 5, "max_kv_size": 64}, "rotating cache"),
    ],
)
def test_bad_options_name_the_flag(changes, fragment):
    with pytest.raises(GenerationError) as e:
        GenerationOptions(**changes).validate()
    assert fragment in str(e.value)


def test_logit_bias_ids_checked_against_the_vocabulary():
    options = GenerationOptions(logit_bias={31999: 1.0, 32000: 2.0})
    with pytest.raises(GenerationError, match=r"32000.*0\.\.31999"):
        options.check_logit_bias(32000)
    GenerationOptions(logit_bias={31999: 1.0}).check_logit_bias(32000)


def test_lookup_and_draft_model_are_one_choice():
    with pytest.raises(GenerationError, match="pick one"):
        GenerationOptions(prompt_lookup_num_tokens=10).check_with_draft()


def write_config(folder, **fields):
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, **fields}))
    return folder


def test_generation_config_sampling_fields(tmp_path):
    write_config(tmp_path, do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.1,
                 max_new_tokens=99, prompt_lookup_num_tokens=4)  # fmt: skip
    assert from_generation_config(tmp_path) == {
        "temp": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1,
        "repetition_scope": "context", "max_tokens": 99, "prompt_lookup_num_tokens": 4,
    }  # fmt: skip
    assert from_generation_config(write_config(tmp_path)) == {}  # Apple's files: ids only
    (tmp_path / "generation_config.json").write_text("{not json")
    assert from_generation_config(tmp_path) == {}


def test_model_defaults_yield_to_the_user(tmp_path):
    base = GenerationOptions()
    inst = with_model_defaults(base, write_config(tmp_path), instruct=True)
    assert (inst.repetition_penalty, inst.repetition_scope) == (1.2, "context")
    assert inst.prompt_lookup_num_tokens == 10
    assert with_model_defaults(base, tmp_path, instruct=False) == base  # plain greedy stays
    mine = with_model_defaults(
        base.replace(repetition_penalty=1.05), tmp_path, instruct=True,
        explicit={"repetition_penalty", "prompt_lookup_num_tokens"},
    )  # fmt: skip
    assert (mine.repetition_penalty, mine.prompt_lookup_num_tokens) == (1.05, None)
    drafted = with_model_defaults(base, tmp_path, instruct=True, draft=True)
    assert drafted.prompt_lookup_num_tokens is None and drafted.repetition_penalty == 1.2
    write_config(tmp_path, do_sample=True, temperature=0.5, top_k=0)
    sampled = with_model_defaults(base, tmp_path, instruct=True, explicit={"top_k"})
    assert (sampled.temp, sampled.top_k, sampled.repetition_penalty) == (0.5, 0, 1.2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"do_sample": True, "temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ({"do_sample": True, "top_k": [1]}, "top_k must be a number, got [1]"),
        ({"repetition_penalty": "x"}, "repetition_penalty must be a number, got 'x'"),
        ({"do_sample": True, "top_p": True}, "top_p must be a number, got True"),
    ],
)
def test_generation_config_with_a_wrong_type_is_one_clear_error(tmp_path, fields, message):
    folder = write_config(tmp_path, **fields)
    with pytest.raises(GenerationError, match=re.escape(message)) as e:
        from_generation_config(folder)
    assert "generation_config.json" in str(e.value) and "fix or remove it" in str(e.value)


def test_generation_config_out_of_range_is_refused_by_the_option_rules(tmp_path):
    folder = write_config(tmp_path, do_sample=True, top_k=2.5)
    with pytest.raises(GenerationError, match="top_k"):
        with_model_defaults(GenerationOptions(), folder, instruct=False)
