"""export-gguf, checked on the file itself: read back with the gguf package's reader (keys, arrays,
tensor names, shapes, types, data, vocabulary scores), fused and quantized sources, the LoRA GGUF,
the Modelfile, bad input through the real CLI, and GGUF as a ``convert`` source."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import sentencepiece as spm
from conftest import make_model_dir
from lora_helpers import make_adapters
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_openelm.cli import app
from mlx_openelm.folder import write_model_folder
from mlx_openelm.loading import load, load_model
from mlx_openelm.lora import AdapterSpec
from mlx_openelm.tokenizer import Tokenizer

from tiny import rel_err

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
runner = CliRunner()
TOKENS = [1, 17, 42, 99, 7, 250, 3, 64]


def export(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, ["export-gguf", *map(str, args)])
    return r.exit_code, r.output


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensor(reader, name: str) -> np.ndarray:
    """A GGUF tensor as float32, rows first (dequantized with gguf's reference code)."""
    t = next(t for t in reader.tensors if t.name == name)
    shape = tuple(reversed(t.shape.tolist()))
    if t.tensor_type.name == "BF16":
        bits = np.ascontiguousarray(t.data).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


def logits(model: nn.Module, tokens: list[int] = TOKENS) -> np.ndarray:
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def f32_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    code, text = export(tiny_model_dir, out, "--outtype", "f32", "--ollama")
    assert code == 0, text
    assert f"Wrote f32 model to {out}" in text
    return out


def test_metadata_is_what_llama_cpp_reads_for_openelm(f32_gguf, tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    kv = fields(gguf.GGUFReader(f32_gguf))
    assert kv["general.architecture"] == "openelm" and kv["general.type"] == "model"
    assert kv["general.file_type"] == 0  # ALL_F32
    assert kv["openelm.block_count"] == cfg["num_transformer_layers"] == 4
    assert kv["openelm.embedding_length"] == 64 and kv["openelm.context_length"] == 2048
    assert kv["openelm.attention.head_count"] == cfg["num_query_heads"] == [2, 4, 4, 4]
    assert kv["openelm.attention.head_count_kv"] == cfg["num_kv_heads"] == [1, 2, 2, 2]
    # make_divisible(m * 64, 32) for m = linspace(0.5, 4, 4) rounded: 32, 128, 192, 256
    assert kv["openelm.feed_forward_length"] == [32, 128, 192, 256]
    assert kv["openelm.rope.freq_base"] == 10000.0
    assert kv["openelm.rope.dimension_count"] == kv["openelm.attention.key_length"] == 16
    assert kv["openelm.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert kv["tokenizer.ggml.unknown_token_id"] == 0 and kv["tokenizer.ggml.model"] == "llama"
    assert kv["tokenizer.ggml.add_bos_token"] is True
    assert kv["tokenizer.chat_template"] == Tokenizer.from_folder(tiny_model_dir).chat_template


def test_vocabulary_has_sentencepiece_scores_and_types(f32_gguf, tiny_model_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    kv = fields(gguf.GGUFReader(f32_gguf))
    n = sp.vocab_size()
    assert kv["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert kv["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(n)])
    types = kv["tokenizer.ggml.token_type"]
    normal = [kv["tokenizer.ggml.scores"][i] for i in range(n) if types[i] == 1]
    assert len(set(normal)) == len(normal) > 100  # real merge priorities, not placeholders
    assert types[0] == 2 and types[1] == types[2] == 3  # <unk> UNKNOWN, <s> </s> CONTROL
    assert [types[i] for i in range(n) if sp.is_byte(i)] == [6] * 256  # BYTE pieces


def test_tensors_names_shapes_and_exact_f32_data(f32_gguf, tiny_model_dir):
    weights = mx.load(str(tiny_model_dir / "model.safetensors"))
    reader = gguf.GGUFReader(f32_gguf)
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert len(names) == 2 + 4 * 9
    for i, ffn in enumerate([32, 128, 192, 256]):
        proj_1 = np.array(weights[f"transformer.layers.{i}.ffn.proj_1.weight"])
        np.testing.assert_array_equal(tensor(reader, f"blk.{i}.ffn_gate.weight"), proj_1[:ffn])
        np.testing.assert_array_equal(tensor(reader, f"blk.{i}.ffn_up.weight"), proj_1[ffn:])
        qkv = weights[f"transformer.layers.{i}.attn.qkv_proj.weight"]
        np.testing.assert_array_equal(tensor(reader, f"blk.{i}.attn_qkv.weight"), np.array(qkv))
        assert names[f"blk.{i}.attn_q_norm.weight"].tensor_type.name == "F32"
    embed = np.array(weights["transformer.token_embeddings.weight"])
    np.testing.assert_array_equal(tensor(reader, "token_embd.weight"), embed)
    assert list(names["token_embd.weight"].shape) == [64, embed.shape[0]]  # ggml: (ne0=dim, rows)


@pytest.mark.parametrize(
    ("outtype", "weight_type", "file_type", "tol"),
    [("f16", "F16", 1, 1e-3), ("bf16", "BF16", 32, 8e-3), ("q8_0", "Q8_0", 7, 1e-2)],
)
def test_outtypes_store_weights_in_their_type_and_norms_in_f32(
    tiny_model_dir, tmp_path, outtype, weight_type, file_type, tol
):
    out = tmp_path / f"m-{outtype}.gguf"
    assert export(tiny_model_dir, out, "--outtype", outtype)[0] == 0
    reader = gguf.GGUFReader(out)
    assert fields(reader)["general.file_type"] == file_type
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}
    assert {types[n] for n in types if not n.endswith("norm.weight")} == {weight_type}
    qkv = np.array(mx.load(str(tiny_model_dir / "model.safetensors"))[
        "transformer.layers.2.attn.qkv_proj.weight"
    ])  # fmt: skip
    assert rel_err(tensor(reader, "blk.2.attn_qkv.weight"), qkv) < tol


def test_default_is_f16(tiny_model_dir, tmp_path):
    assert export(tiny_model_dir, tmp_path / "m.gguf")[0] == 0
    assert fields(gguf.GGUFReader(tmp_path / "m.gguf"))["general.file_type"] == 1


def test_modelfile_for_ollama(f32_gguf):
    text = (f32_gguf.parent / "Modelfile").read_text()
    assert f"FROM ./{f32_gguf.name}\n" in text
    assert 'PARAMETER stop "</s>"' in text and 'PARAMETER stop "<|user|>"' in text
    assert "PARAMETER num_ctx 2048" in text and "PARAMETER temperature 0.0" in text
    assert "<|user|>\n{{ .Content }}</s>\n" in text and "{{- end }}<|assistant|>\n" in text


def test_adapter_is_fused_exactly(tiny_model_dir, tmp_path):
    spec = AdapterSpec(rank=4, alpha=12.0, num_layers=4, targets=("qkv_proj", "proj_1"))
    adapter = make_adapters(tiny_model_dir, tmp_path / "lora", spec)
    out = tmp_path / "fused.gguf"
    code, text = export(tiny_model_dir, out, "--adapter", adapter, "--outtype", "f32")
    assert code == 0 and "8 adapter layer(s) fused" in text, text
    # W + scale · (lora_a @ lora_b)ᵀ in float64 (scale = alpha / rank = 3), the reference
    saved = mx.load(str(adapter / "adapters.safetensors"))
    factors = {k: np.array(v, np.float64) for k, v in saved.items()}
    base = mx.load(str(tiny_model_dir / "model.safetensors"))
    path = "transformer.layers.3.ffn.proj_1"
    want = (
        np.array(base[f"{path}.weight"], np.float64)
        + 3.0 * (factors[f"{path}.lora_a"] @ factors[f"{path}.lora_b"]).T
    )
    reader = gguf.GGUFReader(out)
    got = np.concatenate([tensor(reader, f"blk.3.ffn_{x}.weight") for x in ("gate", "up")])
    assert rel_err(got, want) < 1e-6


def test_quantized_folder_is_dequantized_and_says_so(tiny_model_dir, tmp_path):
    model, _ = load(tiny_model_dir)
    nn.quantize(model, group_size=32, bits=8)
    config = {**json.loads((tiny_model_dir / "config.json").read_text())}
    config["quantization"] = {"group_size": 32, "bits": 8}
    q8 = write_model_folder(tmp_path / "q8", config, tree_flatten(model.parameters()),
                            Tokenizer.from_folder(tiny_model_dir))["path"]  # fmt: skip
    code, text = export(q8, tmp_path / "q8.gguf", "--outtype", "f32")
    assert code == 0 and "dequantized" in text, text
    dequantized, _ = load_model(q8, dequantize=False)  # the packed codes, to compare with
    reader = gguf.GGUFReader(tmp_path / "q8.gguf")
    layer = dequantized.layers[1].attn.qkv_proj
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=8)
    np.testing.assert_array_equal(tensor(reader, "blk.1.attn_qkv.weight"), np.array(w))


def test_lora_only_gguf(tiny_model_dir, tmp_path):
    spec = AdapterSpec(rank=4, alpha=12.0, num_layers=2, targets=("qkv_proj", "proj_1"))
    adapter = make_adapters(tiny_model_dir, tmp_path / "lora", spec)
    out = tmp_path / "adapter.gguf"
    code, text = export(tiny_model_dir, out, "--adapter", adapter, "--lora-only")
    assert code == 0 and "Wrote LoRA adapter" in text, text
    reader = gguf.GGUFReader(out)
    kv = fields(reader)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "openelm"
    assert kv["adapter.lora.alpha"] == pytest.approx(12.0)  # alpha / r = mlx-lm's scale 3
    factors = mx.load(str(adapter / "adapters.safetensors"))
    names = sorted(t.name for t in reader.tensors)
    assert len(names) == 2 * 3 * 2  # layers 2, 3 × (qkv, gate, up) × (a, b)
    a = np.array(factors["transformer.layers.3.ffn.proj_1.lora_a"])  # (in, r)
    b = np.array(factors["transformer.layers.3.ffn.proj_1.lora_b"])  # (r, 2·ffn)
    np.testing.assert_array_equal(tensor(reader, "blk.3.ffn_gate.weight.lora_a"), a.T)
    np.testing.assert_array_equal(tensor(reader, "blk.3.ffn_up.weight.lora_a"), a.T)
    np.testing.assert_array_equal(tensor(reader, "blk.3.ffn_gate.weight.lora_b"), b.T[:256])
    np.testing.assert_array_equal(tensor(reader, "blk.3.ffn_up.weight.lora_b"), b.T[256:])


def test_bad_input_is_one_line_and_exit_1(tiny_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    code, text = export(tiny_model_dir, out)
    assert code == 1 and "already exists" in text and "--force" in text
    assert out.read_text() == "keep me"
    code, text = export(tiny_model_dir, tmp_path / "x.gguf", "--outtype", "q4_k")
    assert code == 1 and "--outtype must be one of f32, f16, bf16, q8_0" in text
    untied = make_model_dir(tmp_path / "untied", tiny_model_dir / "tokenizer.model",
                            share_input_output_layers=False)  # fmt: skip
    code, text = export(untied, tmp_path / "u.gguf")
    assert code == 1 and "own output head" in text and len(text.strip().splitlines()) == 1
    gelu = make_model_dir(tmp_path / "gelu", tiny_model_dir / "tokenizer.model",
                          activation_fn_name="gelu")  # fmt: skip
    code, text = export(gelu, tmp_path / "g.gguf")
    assert code == 1 and "llama.cpp's graph uses SiLU" in text
    spec = AdapterSpec(rank=4, alpha=8.0, num_layers=2, targets=("qkv_proj",))
    other = make_model_dir(tmp_path / "wide", tiny_model_dir / "tokenizer.model", model_dim=96)
    adapter = make_adapters(other, tmp_path / "other-lora", spec)
    for extra in ([], ["--lora-only"]):
        code, text = export(tiny_model_dir, tmp_path / "a.gguf", "--adapter", adapter, *extra)
        assert code == 1 and "do not fit this model" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gelu",
        "m.gguf",
        "other-lora",
        "untied",
        "wide",
    ]


def test_write_error_leaves_no_file(tiny_model_dir, tmp_path):
    """A file-size limit makes the write fail like a full disk: one line, exit 1, no file."""
    import resource
    import signal

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limits[1]))
    try:
        code, text = export(tiny_model_dir, tmp_path / "m.gguf")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 1 and "cannot write" in text and "Traceback" not in text, text
    assert list(tmp_path.iterdir()) == []


def test_convert_reads_the_gguf_back(f32_gguf, tiny_model_dir, tmp_path):
    r = runner.invoke(app, ["convert", str(f32_gguf), str(tmp_path / "back"), "--dtype", "float32",
                            "--tokenizer", str(tiny_model_dir / "tokenizer.model")])  # fmt: skip
    assert r.exit_code == 0, r.output
    back, _ = load(tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    ours, _ = load(tiny_model_dir)
    np.testing.assert_array_equal(logits(back), logits(ours))  # f32: bit for bit
    chat = Tokenizer.from_folder(tiny_model_dir).chat_template
    assert Tokenizer.from_folder(tmp_path / "back").chat_template == chat  # carried by the GGUF
    assert config["source"]["format"] == "gguf"


def test_convert_from_q8_0_refuses_another_vocabulary(tiny_model_dir, tmp_path, llama2_tokenizer):
    out = tmp_path / "m.gguf"
    assert export(tiny_model_dir, out, "--outtype", "q8_0")[0] == 0
    r = runner.invoke(app, ["convert", str(out), str(tmp_path / "back"), "--dtype", "float32",
                            "--tokenizer", str(tiny_model_dir / "tokenizer.model")])  # fmt: skip
    assert r.exit_code == 0, r.output
    back, _ = load(tmp_path / "back")
    ours, _ = load(tiny_model_dir)
    assert rel_err(logits(back), logits(ours)) < 2e-2
    r = runner.invoke(app, ["convert", str(out), str(tmp_path / "bad"),
                            "--tokenizer", str(llama2_tokenizer)])  # fmt: skip
    assert r.exit_code == 1 and "but the tokenizer has" in r.output and "--tokenizer" in r.output
    assert not (tmp_path / "bad").exists()
