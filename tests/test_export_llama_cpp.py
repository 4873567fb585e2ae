"""Exported GGUFs checked by llama.cpp itself (llama-cpp-python): logits and greedy tokens against
ours on the trained checkpoint and a tiny random model, every outtype, fused LoRA and base + GGUF
LoRA adapter, and the chat template. Skipped with the reason when llama_cpp is not importable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LLAMA2_TOKENIZER, SHARED
from lora_helpers import make_adapters

from mlx_openelm.export import export_gguf
from mlx_openelm.loading import load
from mlx_openelm.lora import AdapterSpec
from mlx_openelm.tokenizer import ZEPHYR_CHAT_TEMPLATE, Tokenizer

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)"
)
from mlx_openelm.export.llama_cpp import (  # noqa: E402
    llama_greedy,
    llama_logits,
    max_rel_error,
    mlx_greedy,
    mlx_logits,
)
from mlx_openelm.export.llama_cpp import open_llama as _open_llama  # noqa: E402

TRAINED = SHARED / "models" / "openelm-tiny-shakespeare"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained checkpoint with the Llama-2 tokenizer, our float32 model and a real text."""
    if not (TRAINED / "model.safetensors").is_file() or not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"trained checkpoint or Llama-2 tokenizer not in {SHARED}")
    model, tok = load(TRAINED, tokenizer=LLAMA2_TOKENIZER)
    lines = (SHARED / "data" / "shakespeare" / "valid.jsonl").read_text().splitlines()
    text = " ".join(json.loads(line)["text"] for line in lines[:4])
    tokens = tok.encode(text)  # BOS + text
    return model, tokens, tmp_path_factory.mktemp("trained-gguf")


def open_llama(path: Path, **kw):
    return _open_llama(path, threads=1, **kw)  # one thread: robust on a busy shared machine


def export(model_dir: Path, out: Path, outtype: str, **kw) -> Path:
    export_gguf(model_dir, out, outtype=outtype, tokenizer=LLAMA2_TOKENIZER, **kw)
    return out


def test_f32_logits_and_greedy_tokens_match_llama_cpp(trained):
    model, tokens, tmp = trained
    llm = open_llama(export(TRAINED, tmp / "f32.gguf", "f32"), n_ctx=256)
    prompt = tokens[:64]
    assert max_rel_error(llama_logits(llm, prompt), mlx_logits(model, prompt)) < 1e-3
    assert llama_greedy(llm, prompt, 32) == mlx_greedy(model, prompt, 32)
    assert llm.tokenize(b"Hello world, my lord.") == Tokenizer(LLAMA2_TOKENIZER).encode(
        "Hello world, my lord."
    )  # the vocabulary (scores, types) tokenizes as SentencePiece does


@pytest.mark.parametrize(("outtype", "tol"), [("f16", 5e-3), ("bf16", 3e-2)])
def test_half_precision_within_its_precision(trained, outtype, tol):
    model, tokens, tmp = trained
    llm = open_llama(export(TRAINED, tmp / f"{outtype}.gguf", outtype), n_ctx=256)
    assert max_rel_error(llama_logits(llm, tokens[:64]), mlx_logits(model, tokens[:64])) < tol


def test_q8_0_top1_agreement_over_held_out_text(trained):
    model, tokens, tmp = trained
    text = tokens[:512]
    llm = open_llama(export(TRAINED, tmp / "q8_0.gguf", "q8_0"), n_ctx=512)
    agree = (llama_logits(llm, text).argmax(-1) == mlx_logits(model, text).argmax(-1)).mean()
    assert agree >= 0.98


def test_tiny_random_model_f32(tiny_model_dir, tmp_path):
    model, _ = load(tiny_model_dir)
    out = tmp_path / "tiny.gguf"
    export_gguf(tiny_model_dir, out, outtype="f32")
    llm = open_llama(out, n_ctx=64)
    tokens = [1, 17, 42, 99, 7, 250, 3, 64, 11, 300]
    assert max_rel_error(llama_logits(llm, tokens), mlx_logits(model, tokens)) < 1e-3


def test_fused_and_gguf_lora_give_our_base_plus_adapter(tiny_model_dir, tmp_path):
    targets = ("qkv_proj", "out_proj", "proj_1", "proj_2")
    spec = AdapterSpec(rank=4, alpha=16.0, num_layers=4, targets=targets)
    adapter = make_adapters(tiny_model_dir, tmp_path / "lora", spec)
    tuned, _ = load(tiny_model_dir, adapter_path=adapter)
    base, _ = load(tiny_model_dir)
    tokens = [1, 17, 42, 99, 7, 250, 3, 64, 11, 300]
    want = mlx_logits(tuned, tokens)
    assert max_rel_error(mlx_logits(base, tokens), want) > 1e-2  # the adapter matters
    fused = tmp_path / "fused.gguf"
    export_gguf(tiny_model_dir, fused, adapter=adapter, outtype="f32")
    assert max_rel_error(llama_logits(open_llama(fused, n_ctx=64), tokens), want) < 1e-3
    base_gguf, lora = tmp_path / "base.gguf", tmp_path / "adapter.gguf"
    export_gguf(tiny_model_dir, base_gguf, outtype="f32")
    export_gguf(tiny_model_dir, lora, adapter=adapter, lora_only=True)
    llm = open_llama(base_gguf, n_ctx=64, lora_path=str(lora))
    assert max_rel_error(llama_logits(llm, tokens), want) < 1e-3


def test_chat_template_renders_our_prompt_tokens(trained, tmp_path):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Who is Othello?"},
        {"role": "assistant", "content": "A Moor."},
        {"role": "user", "content": "And Iago?"},
    ]
    from mlx_openelm.convert import convert

    instruct = tmp_path / "instruct"  # the trained model with Zephyr's template, as -Instruct
    convert(TRAINED, instruct, tokenizer=LLAMA2_TOKENIZER, chat_template="zephyr")
    ours = Tokenizer.from_folder(instruct)
    out = export(instruct, tmp_path / "chat.gguf", "f16")
    llm = open_llama(out, n_ctx=128, logits_all=False)
    template = llm.metadata["tokenizer.chat_template"]
    assert template == ZEPHYR_CHAT_TEMPLATE
    rendered = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")(messages=messages)
    theirs = llm.tokenize(rendered.prompt.encode(), add_bos=True, special=True)
    assert theirs == ours.apply_chat_template(messages, tokenize=True)


def test_bench_compare_llama_cpp_prints_its_row(tiny_model_dir):
    from typer.testing import CliRunner

    from mlx_openelm.cli import app

    args = ["bench", "-m", str(tiny_model_dir), "-p", "8", "-g", "4", "-n", "1"]
    r = CliRunner().invoke(app, [*args, "--compare-llama-cpp", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{") :])
    rows = {row["name"]: row for row in data["rows"]}
    assert set(rows) == {"mlx-openelm", "llama.cpp F32"}
    assert rows["llama.cpp F32"]["generation_tps"] > 0 and rows["llama.cpp F32"]["trials"] == 1
    assert data["ratio_llama_cpp"]["generation_tps"] == pytest.approx(
        rows["mlx-openelm"]["generation_tps"] / rows["llama.cpp F32"]["generation_tps"]
    )
    assert "one per core" in data["bandwidth_method"] and data["decode_limit_tps"] > 0
