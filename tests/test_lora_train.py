"""The training loop: packing equivalence, exact resume, accumulation, schedules, QLoRA/DoRA/full,
best checkpoint, early stop and a real-data run on WikiSQL."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import SHARED, make_model_dir
from lora_helpers import randomize_adapters, text_data
from mlx.utils import tree_flatten

from mlx_openelm.folder import write_model_folder
from mlx_openelm.loading import load
from mlx_openelm.lora import AdapterSpec, StepReport, TrainConfig, compute, finetune
from mlx_openelm.lora.adapters import apply_adapters, save_adapters
from mlx_openelm.lora.batching import auto_pack_length, make_batch, plan_rows
from mlx_openelm.lora.compute import batch_arrays, evaluate, frozen_head_weight, loss_sums
from mlx_openelm.lora.data import Example, encode_file
from mlx_openelm.lora.metrics import read_metrics
from mlx_openelm.lora.optim import make_schedule
from mlx_openelm.tokenizer import Tokenizer

WIKISQL = SHARED / "data" / "wikisql"
FAST = TrainConfig(iters=8, batch_size=2, max_seq_len=64, val_every=4, save_every=4,
                   learning_rate=1e-3)  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return text_data(tmp_path_factory.mktemp("data"), n_train=40, n_valid=8, n_test=6)


def curve(path: Path) -> list[tuple]:
    """The run's losses, without the timing fields."""
    return [
        (r["step"], r.get("train_loss"), r.get("learning_rate"), r.get("val_loss"))
        for r in read_metrics(path / "metrics.jsonl")
    ]


def adapters(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()}


def test_packed_loss_equals_unpacked_loss(tiny_model_dir, data_dir):
    model, tok = load(tiny_model_dir)
    apply_adapters(model, AdapterSpec(rank=4))
    randomize_adapters(model)
    examples = encode_file(data_dir / "train.jsonl", tok, 128).examples[:16]
    packed_rows = plan_rows(examples, 128, pack=True)
    assert len(packed_rows) < len(examples)  # several examples share a row
    packed = make_batch(examples, packed_rows, 128, packed=True)
    unpacked = make_batch(examples, plan_rows(examples, 128, pack=False), 128, packed=False)
    assert packed.inputs.size < unpacked.inputs.size  # less padding
    (sp, np_), (su, nu) = (loss_sums(model, *batch_arrays(b)) for b in (packed, unpacked))
    assert np_.item() == nu.item()
    # Examples start at offsets up to ~100 inside a row; RoPE is relative, so no change.
    assert sp.item() == pytest.approx(su.item(), rel=1e-5)


def test_resume_continues_the_same_loss_curve(tiny_model_dir, data_dir, tmp_path):
    config = replace(FAST, iters=10, grad_accum=2, lr_schedule="cosine", warmup=2, val_every=3)
    spec = AdapterSpec(dropout=0.1)  # exercises the dropout random stream too
    run = dict(data=data_dir, spec=spec, config=config)
    finetune(tiny_model_dir, tmp_path / "whole", **run)

    def crash(event: object) -> None:
        if isinstance(event, StepReport) and event.step == 6:
            raise KeyboardInterrupt  # dies after the step-4 checkpoint

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model_dir, tmp_path / "cut", callback=crash, **run)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and len(state["data_order"]) > 0
    result = finetune(tiny_model_dir, tmp_path / "cut", resume=True, **run)
    assert result.steps == 10
    assert curve(tmp_path / "cut") == curve(tmp_path / "whole")  # bit for bit
    whole, cut = adapters(tmp_path / "whole"), adapters(tmp_path / "cut")
    assert all(np.array_equal(whole[k], cut[k]) for k in whole)


def test_resume_extends_a_constant_schedule_but_not_a_decaying_one(
    tiny_model_dir, data_dir, tmp_path
):
    from mlx_openelm.errors import ConfigError

    finetune(tiny_model_dir, tmp_path / "whole", data=data_dir, config=FAST)  # 8 steps
    finetune(tiny_model_dir, tmp_path / "more", data=data_dir, config=replace(FAST, iters=4))
    result = finetune(tiny_model_dir, tmp_path / "more", data=data_dir, config=FAST, resume=True)
    assert result.steps == 8
    assert curve(tmp_path / "more") == curve(tmp_path / "whole")  # 4 steps, then 4 more
    whole, more = adapters(tmp_path / "whole"), adapters(tmp_path / "more")
    assert all(np.array_equal(whole[k], more[k]) for k in whole)
    with pytest.raises(ConfigError, match="checkpoint is at step 8, past the 4 steps"):
        finetune(tiny_model_dir, tmp_path / "more", data=data_dir, config=replace(FAST, iters=4),
                 resume=True)  # fmt: skip
    with pytest.raises(ConfigError, match=r"resume with changed settings[^;]*: --lr-schedule was"):
        finetune(tiny_model_dir, tmp_path / "more", data=data_dir, resume=True,
                 config=replace(FAST, lr_schedule="cosine"))  # fmt: skip
    # A cosine schedule spans --iters: a longer run would have had other rates all along.
    cosine = replace(FAST, iters=4, lr_schedule="cosine")
    finetune(tiny_model_dir, tmp_path / "cos", data=data_dir, config=cosine)
    with pytest.raises(ConfigError, match=r"--iters was 4, now 8 \(the learning-rate schedule"):
        finetune(tiny_model_dir, tmp_path / "cos", data=data_dir, resume=True,
                 config=replace(cosine, iters=8))  # fmt: skip


def test_grad_accumulation_equals_the_bigger_batch(tiny_model_dir, data_dir, tmp_path):
    big = finetune(tiny_model_dir, tmp_path / "big", data=data_dir,
                   config=replace(FAST, batch_size=4))  # fmt: skip
    acc = finetune(tiny_model_dir, tmp_path / "acc", data=data_dir,
                   config=replace(FAST, batch_size=2, grad_accum=2))  # fmt: skip
    assert big.steps == acc.steps == 8
    for a, b in zip(curve(tmp_path / "big"), curve(tmp_path / "acc")):
        assert a[0] == b[0]
        assert np.allclose([x for x in a[1:] if x], [x for x in b[1:] if x], rtol=1e-5)


def test_grad_checkpoint_gives_the_same_training(tiny_model_dir, data_dir, tmp_path):
    plain = finetune(tiny_model_dir, tmp_path / "a", data=data_dir, config=FAST)
    ckpt = finetune(tiny_model_dir, tmp_path / "b", data=data_dir,
                    config=replace(FAST, grad_checkpoint=True))  # fmt: skip
    assert ckpt.train_loss == pytest.approx(plain.train_loss, rel=1e-5)
    model, _ = load(tiny_model_dir)
    assert type(model.layers[0]).__name__ == "TransformerBlock"  # no class patched globally


def test_schedules():
    lr = [make_schedule("cosine", 1.0, 10, warmup=2)(mx.array(s)).item() for s in range(10)]
    assert lr[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lr[2] > lr[5] > lr[9] > 0
    assert lr[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    linear = make_schedule("linear", 2.0, 4)
    assert [linear(mx.array(s)).item() for s in range(4)] == pytest.approx([2, 1.5, 1, 0.5])
    assert make_schedule("constant", 3.0, 4)(mx.array(3)).item() == pytest.approx(3.0)


def test_fused_head_loss_and_gradients_equal_the_logits_path(tiny_model_dir, data_dir, monkeypatch):
    model, tok = load(tiny_model_dir)
    apply_adapters(model, AdapterSpec(rank=4))
    randomize_adapters(model)
    head = frozen_head_weight(model)
    assert head is model.transformer.token_embeddings.weight
    monkeypatch.setattr(compute, "HEAD_CHUNK", head.shape[0] * 5)  # 5 tokens a piece, ragged
    examples = encode_file(data_dir / "train.jsonl", tok, 128).examples[:8]
    batch = batch_arrays(make_batch(examples, plan_rows(examples, 128, True), 128, True))

    def run(fused: bool):
        loss = nn.value_and_grad(model, lambda *a: loss_sums(*a, fused_head=fused))
        (total, count), grads = loss(model, *batch)
        return total.item(), count.item(), dict(tree_flatten(grads))

    fused, plain = run(True), run(False)
    assert fused[1] == plain[1]
    assert fused[0] == pytest.approx(plain[0], rel=1e-5)
    for name, g in plain[2].items():
        err = mx.abs(fused[2][name] - g).max() / mx.abs(g).max()
        assert err.item() < 1e-4, name


def test_fused_head_only_for_a_plain_frozen_head(tiny_model_dir):
    model, _ = load(tiny_model_dir)
    apply_adapters(model, AdapterSpec(rank=4))
    assert frozen_head_weight(model) is not None
    model.transformer.token_embeddings.unfreeze()  # trained embeddings need their gradient
    assert frozen_head_weight(model) is None
    model, _ = load(tiny_model_dir)
    nn.quantize(model, group_size=32, bits=4)  # QLoRA: the head is quantized
    apply_adapters(model, AdapterSpec(rank=4))
    assert frozen_head_weight(model) is None


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full_adapters_reload_to_the_same_model(tiny_model_dir, data_dir, tmp_path, kind):
    spec = AdapterSpec(fine_tune_type=kind, num_layers=2)
    finetune(tiny_model_dir, tmp_path / kind, data=data_dir, spec=spec,
             config=replace(FAST, iters=2, save_every=2))  # fmt: skip
    config = json.loads((tmp_path / kind / "adapter_config.json").read_text())
    assert (config["fine_tune_type"], config["num_layers"]) == (kind, 2)
    names = set(adapters(tmp_path / kind))
    assert all(n.startswith(("transformer.layers.2.", "transformer.layers.3.")) for n in names)
    if kind == "full":
        assert "transformer.layers.3.ffn.proj_1.weight" in names
    else:
        assert "transformer.layers.3.attn.qkv_proj.m" in names
    base, _ = load(tiny_model_dir)
    tuned, _ = load(tiny_model_dir, adapter_path=tmp_path / kind)
    x = mx.array([[1, 17, 42, 99, 7]])
    assert not mx.allclose(base(x), tuned(x)).item()  # the adapters do something


def quantized_model_dir(folder: Path, output: Path) -> Path:
    """``folder`` re-written 4-bit (groups of 32), as the converter's ``-q`` would."""
    model, _ = load(folder)
    nn.quantize(model, group_size=32, bits=4)
    config = json.loads((folder / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4}
    tensors = tree_flatten(model.parameters())
    write_model_folder(output, config, tensors, Tokenizer.from_folder(folder))
    return output


def test_qlora_trains_a_quantized_base(tiny_model_dir, data_dir, tmp_path):
    qdir = quantized_model_dir(tiny_model_dir, tmp_path / "q")
    result = finetune(qdir, tmp_path / "qa", data=data_dir, config=replace(FAST, iters=4))
    first = read_metrics(tmp_path / "qa" / "metrics.jsonl")[0]["val_loss"]
    assert result.val_loss < first
    weights = adapters(tmp_path / "qa")
    assert all(k.endswith(("lora_a", "lora_b")) for k in weights)  # the base stays quantized
    model, _ = load(qdir, adapter_path=tmp_path / "qa", dequantize=False)
    assert isinstance(model.layers[0].attn.qkv_proj.linear, nn.QuantizedLinear)


def test_keep_best_and_early_stop(tiny_model_dir, data_dir, tmp_path):
    # A learning rate of 1e-30 moves the outputs less than one float32 ulp, so it never improves
    # the validation loss: stop after 2 validations (0 itself is refused as a learning rate).
    config = replace(FAST, learning_rate=1e-30, val_every=1, early_stop=2, keep_best=True)
    result = finetune(tiny_model_dir, tmp_path / "es", data=data_dir, config=config)
    assert result.stopped_early and result.steps == 2 and result.best_step == 0
    assert (tmp_path / "es" / "best" / "adapters.safetensors").is_file()
    best, final = adapters(tmp_path / "es" / "best"), adapters(tmp_path / "es")
    assert all(np.array_equal(best[k], final[k]) for k in best)
    state = json.loads((tmp_path / "es" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2  # the stopping point is checkpointed


def test_keep_best_picks_the_lowest_validation_loss(tiny_model_dir, data_dir, tmp_path):
    config = replace(FAST, iters=6, val_every=2, keep_best=True)
    result = finetune(tiny_model_dir, tmp_path / "kb", data=data_dir, config=config)
    vals = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "kb" / "metrics.jsonl")
            if "val_loss" in r}  # fmt: skip
    assert result.best_step == min(vals, key=vals.get)
    model, tok = load(tiny_model_dir, adapter_path=tmp_path / "kb")
    valid = encode_file(data_dir / "valid.jsonl", tok, 64)
    loss, _ = evaluate(model, valid, 2, 64, True)
    assert loss == pytest.approx(vals[result.best_step], rel=1e-5)


def test_test_split_and_plot(tiny_model_dir, data_dir, tmp_path):
    result = finetune(tiny_model_dir, tmp_path / "t", data=data_dir, config=FAST, test=True,
                      plot=True)  # fmt: skip
    assert result.extra["test_ppl"] == pytest.approx(math.exp(result.extra["test_loss"]))
    assert (tmp_path / "t" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_lowers_validation_loss_on_wikisql(llama2_tokenizer, tmp_path):
    if not (WIKISQL / "train.jsonl").is_file():
        pytest.skip(f"WikiSQL not at {WIKISQL} (../shared absent)")
    # dim 64, 2 layers, the real 32000-token vocabulary; packed rows of 128 tokens.
    folder = make_model_dir(tmp_path / "m", llama2_tokenizer, instruct=False,
                            num_transformer_layers=2)  # fmt: skip
    config = TrainConfig(iters=10, batch_size=2, max_seq_len=128, learning_rate=2e-3,
                         val_every=10, val_batches=2, save_every=10)  # fmt: skip
    result = finetune(folder, tmp_path / "a", data=WIKISQL, config=config)
    metrics = read_metrics(tmp_path / "a" / "metrics.jsonl")
    vals = [r["val_loss"] for r in metrics if "val_loss" in r]
    assert len(vals) == 2 and result.steps == 10
    assert vals[1] < 0.7 * vals[0], vals


def test_auto_pack_length_fits_the_longest_example():
    def examples(*lengths: int) -> list[Example]:
        return [Example(np.arange(n + 1, dtype=np.int32), np.ones(n + 1, bool)) for n in lengths]

    assert auto_pack_length(examples(10, 33, 20), 2048) == 64  # 33 inputs -> 64
    assert auto_pack_length(examples(10, 64), 2048) == 64
    assert auto_pack_length(examples(10, 300), 256) == 300  # truncated to 256 + 1 tokens upstream
    assert auto_pack_length(examples(10, 200), 100) == 200


def test_wikisql_packs_into_rows_of_256(llama2_tokenizer):
    if not (WIKISQL / "train.jsonl").is_file():
        pytest.skip(f"WikiSQL not at {WIKISQL} (../shared absent)")
    tok = Tokenizer(llama2_tokenizer)
    data = encode_file(WIKISQL / "train.jsonl", tok, 2048).examples
    length = auto_pack_length(data, 2048)
    assert length == 256  # the longest example has 241 input positions
    rows = plan_rows(data, length, pack=True)
    useful = sum(e.num_inputs for e in data)
    assert useful / (len(rows) * length) > 0.88  # vs 0.77 for mlx-lm's padded batches of 4


def test_save_adapters_is_mlx_lm_layout(tiny_model_dir, tmp_path):
    model, _ = load(tiny_model_dir)
    config = apply_adapters(model, AdapterSpec(rank=4, alpha=8, targets=("qkv_proj",)))
    save_adapters(model, tmp_path / "a", config)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                        "keys": ["attn.qkv_proj"]}  # fmt: skip
    assert saved["num_layers"] == 4


def test_epochs_set_the_number_of_steps(tiny_model_dir, data_dir, tmp_path):
    config = replace(FAST, iters=None, epochs=2, grad_accum=2, save_every=100)
    result = finetune(tiny_model_dir, tmp_path / "e", data=data_dir, config=config)
    _, tok = load(tiny_model_dir)
    rows = plan_rows(encode_file(data_dir / "train.jsonl", tok, 64).examples, 64, pack=True)
    assert result.steps == 2 * (len(rows) // 2 // 2)  # rows per batch, batches per step
    epochs = {r["epoch"] for r in read_metrics(tmp_path / "e" / "metrics.jsonl") if "epoch" in r}
    assert epochs == {0, 1}
