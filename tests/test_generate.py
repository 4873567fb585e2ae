"""Generation: greedy parity with the float64 reference, speculative decoding, stop strings,
prompts (chat template, raw, stdin), option checks, and the ``generate`` command end to end."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model_dir, one_error_line
from typer.testing import CliRunner

import mlx_openelm
from mlx_openelm.cli import app
from mlx_openelm.errors import GenerationError
from mlx_openelm.generate import (
    GenerationOptions,
    StopMatcher,
    build_prompt,
    generate,
    stream_generate,
)
from mlx_openelm.serve.schema import parse_request

import openelm_ref

runner = CliRunner()
PROMPT = "hello world"
STATS = re.compile(r"prompt: (\d+) tokens, .* generated: (\d+) tokens, .* finish: (\w+)")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_spm):
    """Instruct, base and draft tiny models; seed 3 gives a varied greedy continuation."""
    root = tmp_path_factory.mktemp("gen")
    return {
        "inst": make_model_dir(root / "inst", tiny_spm, seed=3),
        "base": make_model_dir(root / "base", tiny_spm, seed=3, instruct=False),
        "draft": make_model_dir(root / "draft", tiny_spm, seed=5, num_transformer_layers=2),
        "bad_draft": make_model_dir(root / "bad", tiny_spm, seed=5, vocab_size=512),
    }


@pytest.fixture(scope="module")
def inst(dirs):
    return mlx_openelm.load(dirs["inst"])


def reference_weights(folder) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(folder / "model.safetensors")).items()}


def cli(*args: str, input: str | None = None):
    return runner.invoke(app, ["generate", *args], input=input)


def test_greedy_matches_float64_reference(dirs, inst):
    model, tok = inst
    ids = build_prompt(tok, PROMPT)
    tokens = [r.token for r in stream_generate(model, tok, ids, max_tokens=12)]
    ref = openelm_ref.greedy(reference_weights(dirs["inst"]), ids, 12, head_dim=16)
    assert tokens == ref
    assert len(set(tokens)) > 2  # a continuation with some variety, not one repeated token


def test_cli_prints_reference_text_and_stats(dirs, inst):
    model, tok = inst
    ids = tok.encode_chat([{"role": "user", "content": PROMPT}])
    ref = openelm_ref.greedy(reference_weights(dirs["inst"]), ids, 10, head_dim=16)
    result = cli("--model", str(dirs["inst"]), "--prompt", PROMPT, "--max-tokens", "10")
    assert result.exit_code == 0, result.output
    assert result.stdout == tok.decode(ref) + "\n"
    stats = STATS.search(result.stderr)
    assert stats and stats.groups() == (str(len(ids)), "10", "length")
    assert "peak memory:" in result.stderr and "tok/s" in result.stderr


def test_base_model_and_raw_get_bos_plus_text(dirs, inst):
    _, tok = inst
    raw_ids = tok.encode(PROMPT, add_bos=True)
    assert build_prompt(tok, PROMPT, raw=True) == raw_ids
    assert build_prompt(tok, PROMPT, system="be brief") == tok.encode_chat(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    )
    for args in (["--model", str(dirs["base"])], ["--model", str(dirs["inst"]), "--raw"]):
        result = cli(*args, "--prompt", PROMPT, "--max-tokens", "3")
        assert result.exit_code == 0, result.output
        assert STATS.search(result.stderr).group(1) == str(len(raw_ids))


def test_prompt_from_stdin(dirs):
    piped = cli("--model", str(dirs["inst"]), "-p", "-", "-n", "6", input=PROMPT + "\n")
    given = cli("--model", str(dirs["inst"]), "-p", PROMPT, "-n", "6")
    assert piped.exit_code == given.exit_code == 0, piped.output
    assert piped.stdout == given.stdout
    assert STATS.search(piped.stderr).group(1) == STATS.search(given.stderr).group(1)


def test_draft_model_keeps_greedy_output(dirs, inst):
    model, tok = inst
    draft, _ = mlx_openelm.load(dirs["draft"])
    ids = build_prompt(tok, PROMPT)
    plain = [r.token for r in stream_generate(model, tok, ids, 24)]
    spec = list(stream_generate(model, tok, ids, 24, draft_model=draft, num_draft_tokens=3))
    assert [r.token for r in spec] == plain
    assert 0 < sum(r.from_draft for r in spec) < len(spec)
    result = cli(
        "-m", str(dirs["inst"]), "-p", PROMPT, "-n", "24", "--draft-model", str(dirs["draft"])
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == tok.decode(plain) + "\n"
    assert re.search(r"draft accepted: \d+/24 \(\d+%\)", result.stderr)


def test_draft_model_keeps_greedy_output_with_openai_penalties(dirs, inst):
    """mlx-lm's speculative loop shows processors only the last prompt token before the
    reply, so the penalties' count of reply tokens must start there (it started after the
    whole prompt, and with a long prompt the penalties never applied)."""
    model, tok = inst
    draft, _ = mlx_openelm.load(dirs["draft"])
    ids = build_prompt(tok, PROMPT * 4)
    penalties = {"presence_penalty": 2.0, "frequency_penalty": 2.0}
    unpenalized = [r.token for r in stream_generate(model, tok, ids, 24)]
    plain = [r.token for r in stream_generate(model, tok, ids, 24, **penalties)]
    spec = stream_generate(model, tok, ids, 24, draft_model=draft, **penalties)
    assert [r.token for r in spec] == plain != unpenalized


def test_stop_matcher_never_releases_part_of_a_stop_string():
    text, stops = "say 'abc' then abab, then ab!", ["abc", "ab!"]
    for pieces in (list(text), [text[:6], text[6:12], text[12:]]):
        matcher, shown = StopMatcher(stops), ""
        for piece in pieces:
            out, stopped = matcher.push(piece)
            shown += out
            assert "say '".startswith(shown)
            if stopped:
                break
        assert stopped and shown == "say '"
    matcher = StopMatcher(["xyz"])
    assert matcher.push("abx") == ("ab", False)
    assert matcher.push("y") == ("", False)
    assert matcher.flush() == "xy"  # generation ended: the held text was not a stop after all


def test_stop_strings_in_generation(dirs, inst):
    model, tok = inst
    ids = build_prompt(tok, PROMPT)
    full = "".join(r.text for r in stream_generate(model, tok, ids, 30))
    stop = full[8:11]
    expected = full[: full.find(stop)]
    shown = ""
    responses = list(stream_generate(model, tok, ids, 30, stop=["never there", stop]))
    for r in responses:
        shown += r.text
        assert expected.startswith(shown)  # no piece of the stop string is ever released
    assert shown == expected and responses[-1].finish_reason == "stop"
    assert mlx_openelm.generate(model, tok, ids, 30, stop=[stop]) == expected
    result = cli("-m", str(dirs["inst"]), "-p", PROMPT, "-n", "30", "--stop", stop)
    assert result.exit_code == 0 and result.stdout == expected + "\n"
    assert STATS.search(result.stderr).group(3) == "stop"


def test_seeded_sampling_is_reproducible(inst):
    model, tok = inst
    ids = build_prompt(tok, PROMPT)
    runs = [mlx_openelm.generate(model, tok, ids, 16, temp=3.0, top_k=50, seed=11) for _ in "ab"]
    assert runs[0] == runs[1]
    # ...and it is sampling: other seeds give other text, and none of them is the greedy one.
    others = {
        mlx_openelm.generate(model, tok, ids, 16, temp=3.0, top_k=50, seed=s) for s in (12, 13)
    }
    assert runs[0] not in others and len(others) == 2
    assert mlx_openelm.generate(model, tok, ids, 16) not in {runs[0], *others}


def test_text_prompt_and_cache_options(inst):
    model, tok = inst
    ids = tok.encode(PROMPT)
    plain = mlx_openelm.generate(model, tok, ids, 10)
    assert mlx_openelm.generate(model, tok, PROMPT, 10) == plain  # str prompt: BOS added once
    assert mlx_openelm.generate(model, tok, ids, 10, max_kv_size=64) == plain  # never rotates
    responses = list(stream_generate(model, tok, ids, 10, repetition_penalty=1.3))
    assert len(responses) == 10 and responses[-1].finish_reason == "length"


def test_options_object_and_keywords_are_one_shape(inst):
    model, tok = inst
    ids = tok.encode(PROMPT)
    options = GenerationOptions(max_tokens=12, temp=5.0, top_k=40, seed=7, stop=["zz"])
    assert options.stop == ("zz",)  # frozen and hashable: lists become tuples
    by_object = [r.token for r in stream_generate(model, tok, ids, options=options)]
    by_keywords = [
        r.token
        for r in stream_generate(model, tok, ids, 12, temp=5.0, top_k=40, seed=7, stop=["zz"])
    ]
    assert by_object == by_keywords
    other_seed = [r.token for r in stream_generate(model, tok, ids, options=options, seed=8)]
    assert other_seed != by_object  # keywords apply over the object
    with pytest.raises(TypeError):
        GenerationOptions.of(options, temperature=1.0)  # not a field: no silent typo


def test_server_requests_take_the_servers_option_defaults():
    defaults = GenerationOptions(max_tokens=9, temp=0.5, repetition_context_size=7, stop=["x"])
    hi = [{"role": "user", "content": "hi"}]
    req = parse_request({"messages": hi}, chat=True, defaults=defaults)
    assert req.options == defaults and req.max_tokens is None
    req = parse_request(
        {"messages": hi, "temperature": 1, "stop": "y"}, chat=True, defaults=defaults
    )
    assert req.options == defaults.replace(temp=1.0, stop=("y",))


def test_quantized_kv_cache(tiny_spm, tmp_path):
    # KV quantization groups run along head_dim, so this model has head_dim 32 (OpenELM: 64).
    folder = make_model_dir(tmp_path / "m", tiny_spm, model_dim=128, head_dim=32, seed=3)
    model, tok = mlx_openelm.load(folder)
    ids = build_prompt(tok, PROMPT)
    plain = [r.token for r in stream_generate(model, tok, ids, 8)]
    quant = [r.token for r in stream_generate(model, tok, ids, 8, kv_bits=8, kv_group_size=32)]
    assert len(quant) == 8 and quant[:2] == plain[:2]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"top_p": 1.5}, "top_p (--top-p) must be in (0, 1]"),
        ({"top_p": 0.0}, "top_p (--top-p) must be in (0, 1]"),
        ({"temp": -0.1}, "temp (--temp) must be >= 0"),
        ({"max_tokens": 0}, "max_tokens (--max-tokens) must be an integer from 1 to"),
        ({"kv_bits": 7}, "kv_bits (--kv-bits) must be one of"),
        ({"stop": [""]}, "stop strings (--stop) must be non-empty"),
        ({"kv_bits": 4, "max_kv_size": 64}, "kv_bits (--kv-bits) cannot be combined"),
        ({"seed": -1}, "seed (--seed) must be an integer from 0 to 18446744073709551615"),
        ({"seed": 2**70}, "seed (--seed) must be an integer from 0"),
        ({"temp": "hot"}, "temp (--temp) must be >= 0"),
        ({"top_k": 1.5}, "top_k (--top-k) must be an integer"),
        ({"temp": float("nan")}, "temp (--temp) must be >= 0"),
        ({"kv_group_size": 7}, "kv_group_size must be 32, 64 or 128"),
        ({"stop": ["\udcff"]}, "stop strings (--stop) must be non-empty UTF-8 text"),
    ],
)
def test_bad_options_raise(inst, option, message):
    model, tok = inst
    with pytest.raises(GenerationError, match=re.escape(message)):
        list(stream_generate(model, tok, [1, 5], **{"max_tokens": 4, **option}))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--top-p", "1.5"], "--top-p"),
        (["--temp", "-1"], "--temp"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--kv-bits", "7"], "--kv-bits"),
        (["--prompt-lookup", "-1"], "--prompt-lookup"),
        (["--prompt-lookup", "1000"], "from 1 to 64"),
        (["--prompt-lookup-ngram", "0"], "--prompt-lookup-ngram"),
        (["--prompt-lookup-min-ngram", "5"], "at most prompt_lookup_max_ngram"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--presence-penalty", "5"], "[-2, 2]"),
        (["--logit-bias", "5"], "ID=BIAS"),
        (["--logit-bias", "999999=1"], "outside the vocabulary"),
        (["--logit-bias", "5=200"], "[-100, 100]"),
        (["--prompt-lookup", "5", "--max-kv-size", "64"], "rotating cache"),
    ],
)
def test_cli_bad_sampling_values(dirs, args, fragment):
    one_error_line(cli("-m", str(dirs["inst"]), "-p", "hi", *args), fragment)


def test_cli_lookup_with_a_draft_model_says_pick_one(dirs):
    args = ("--prompt-lookup", "5", "--draft-model", str(dirs["draft"]))
    one_error_line(cli("-m", str(dirs["inst"]), "-p", "hi", *args), "pick one")


LOOKUP = re.compile(r"lookup: (\d+) of (\d+) proposed accepted")


def test_cli_prompt_lookup_prints_the_same_text_and_its_counts(dirs):
    plain = cli("-m", str(dirs["inst"]), "-p", PROMPT, "-n", "24")
    looked = cli("-m", str(dirs["inst"]), "-p", PROMPT, "-n", "24", "--prompt-lookup", "5")
    assert looked.exit_code == 0, looked.output
    assert looked.stdout == plain.stdout
    counts = LOOKUP.search(looked.stderr)
    assert counts and int(counts[2]) > 0 and "lookup:" not in plain.stderr


def test_cli_generation_config_defaults_and_raw(dirs, inst, tmp_path):
    """generation_config.json sampling fields are generate's defaults; --raw on a base model
    stays plain greedy; a flag the user gives wins."""
    import shutil

    folder = shutil.copytree(dirs["base"], tmp_path / "base")
    config = {"bos_token_id": 1, "repetition_penalty": 4.0, "prompt_lookup_num_tokens": 4}
    (folder / "generation_config.json").write_text(json.dumps(config))
    model, tok = mlx_openelm.load(folder)
    ids = build_prompt(tok, PROMPT)
    penalized = generate(model, tok, ids, 12, repetition_penalty=4.0, repetition_scope="context")
    assert penalized != generate(model, tok, ids, 12)
    result = cli("-m", str(folder), "-p", PROMPT, "-n", "12")
    assert result.stdout == penalized + "\n" and LOOKUP.search(result.stderr)
    raw = cli("-m", str(folder), "-p", PROMPT, "-n", "12", "--raw")
    assert raw.stdout == generate(model, tok, ids, 12) + "\n" and "lookup" not in raw.stderr
    mine = cli("-m", str(folder), "-p", PROMPT, "-n", "12", "--repetition-penalty", "1")
    assert mine.stdout == generate(model, tok, ids, 12) + "\n"


def test_cli_bad_models(dirs, tmp_path):
    missing = tmp_path / "nowhere"
    one_error_line(cli("-m", str(missing), "-p", "hi"), "not found")
    one_error_line(cli("-m", str(tmp_path), "-p", "hi"), "no config.json")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    one_error_line(cli("-m", str(llama), "-p", "hi"), "'llama'", "OpenELM")
    bad = cli("-m", str(dirs["inst"]), "-p", "hi", "--draft-model", str(dirs["bad_draft"]))
    one_error_line(bad, "512-token vocabulary", "400")
    not_adapters = cli("-m", str(dirs["inst"]), "-p", "hi", "--adapter", str(tmp_path))
    one_error_line(not_adapters, "is not an adapter folder")
    one_error_line(cli("-m", str(dirs["inst"])), "--prompt")
    one_error_line(cli("-m", str(dirs["inst"]), "-p", "-", input="\n"), "empty")


def test_cli_offline_repo_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("MLX_OPENELM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    result = cli("-m", "apple/OpenELM-270M-Instruct", "-p", "hi")
    one_error_line(result, "apple/OpenELM-270M-Instruct", "cache")
    assert not (tmp_path / "home" / "models" / "apple--OpenELM-270M-Instruct").exists()


def test_hub_id_is_converted_once_then_reused(dirs, tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    import mlx_openelm.convert

    calls = []

    def fake_convert(repo_id, output, on_progress=None, **options):  # a download + conversion
        calls.append(repo_id)
        on_progress(SimpleNamespace(phase="convert", bytes_done=0, bytes_total=1))
        shutil.copytree(dirs["inst"], output)

    monkeypatch.setenv("MLX_OPENELM_HOME", str(tmp_path))
    monkeypatch.setattr(mlx_openelm.convert, "convert", fake_convert)
    first = cli("-m", "apple/OpenELM-Tiny-Instruct", "-p", PROMPT, "-n", "4")
    again = cli("-m", "apple/OpenELM-Tiny-Instruct", "-p", PROMPT, "-n", "4")
    assert first.exit_code == again.exit_code == 0, first.output
    assert calls == ["apple/OpenELM-Tiny-Instruct"]
    assert "First use of apple/OpenELM-Tiny-Instruct: converting it" in first.stderr
    assert "First use" not in again.stderr and first.stdout == again.stdout
    assert (tmp_path / "models" / "apple--OpenELM-Tiny-Instruct" / "config.json").is_file()
