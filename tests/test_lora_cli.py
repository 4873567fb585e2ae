"""The lora / fuse / export-peft / import-peft / plot commands through the real CLI, and every
bad input: one red line, exit code 1, nothing written."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import sentencepiece as spm
from conftest import make_model_dir, one_error_line
from lora_helpers import text_data
from typer.testing import CliRunner

from mlx_openelm.cli import app
from mlx_openelm.lora.metrics import read_metrics

runner = CliRunner()
FAST = ["--iters", "4", "--batch-size", "2", "--max-seq-len", "64", "--val-every", "2",
        "--save-every", "2", "--lr", "1e-3"]  # fmt: skip


MAX_SEQ_LEN = 128  # the trained fixture's: longer than its longest example


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return text_data(tmp_path_factory.mktemp("data"), n_train=24, n_valid=6, n_test=4)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "adapters"
    args = ["lora", "-m", str(tiny_model_dir), "--data", str(data_dir), "-o", str(out)]
    result = runner.invoke(
        app, [*args, *FAST, "--max-seq-len", str(MAX_SEQ_LEN), "--test", "--plot"]
    )
    assert result.exit_code == 0, result.output
    assert "test loss" in result.output and "Trained 4 steps" in result.output
    return out


def lora(model: Path, *args: str):
    return runner.invoke(app, ["lora", "-m", str(model), *FAST, *args])


def read_png(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(
            kind + body
        )
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return size[0], size[1], zlib.decompress(idat)


def test_lora_writes_the_adapter_folder(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"adapters.safetensors", "adapter_config.json", "metrics.jsonl", "checkpoint"} <= names
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    width, height, raw = read_png(trained / "loss.png")
    assert (width, height) == (720, 420) and len(raw) == height * (1 + 3 * width)
    assert bytes([31, 119, 180]) in raw  # the train curve's colour was drawn


def test_rows_are_packed_to_the_longest_example(trained, data_dir, tiny_model_dir):
    # The fixture trains under --max-seq-len 128: the longest example decides the row length,
    # rounded up to a multiple of 32, not --max-seq-len. Counted here with SentencePiece
    # itself: an example's inputs are BOS + its text's pieces (EOS is only ever a target).
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    texts = [
        json.loads(line)["text"]
        for line in (data_dir / "train.jsonl").read_text().split("\n")
        if line
    ]
    longest = max(1 + len(sp.encode(t)) for t in texts)
    expected = -(-longest // 32) * 32
    assert expected not in (64, MAX_SEQ_LEN)  # the data can tell the rule from either limit
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["training"]["pack"] is True
    assert config["training"]["pack_length"] == expected
    state = json.loads((trained / "checkpoint" / "state.json").read_text())
    assert state["identity"]["hyperparameters"]["pack_length"] == expected


def test_plot_command(trained, tmp_path):
    result = runner.invoke(app, ["plot", str(trained), "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert read_png(tmp_path / "c.png")[:2] == (720, 420)
    one_error_line(runner.invoke(app, ["plot", str(tmp_path)]))


def test_plot_without_matplotlib_is_one_line(
    trained, data_dir, tiny_model_dir, tmp_path, monkeypatch
):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the [plot] extra were not installed
    install = 'needs the plot extra (matplotlib is not installed): pip install -e ".[plot]"'
    one_error_line(
        runner.invoke(app, ["plot", str(trained), "-o", str(tmp_path / "c.png")]), install
    )
    assert not (tmp_path / "c.png").exists()
    run = tmp_path / "run"
    args = ["--data", str(data_dir), "-o", str(run), "--plot"]
    one_error_line(lora(tiny_model_dir, *args), install)  # before training, not after it
    assert not run.exists()


def test_fuse_and_peft_commands(tiny_model_dir, trained, tmp_path):
    fused = runner.invoke(
        app,
        ["fuse", "-m", str(tiny_model_dir), "--adapter", str(trained), "-o", str(tmp_path / "f")],
    )
    assert fused.exit_code == 0 and "Fused 16 lora layer(s)" in fused.output, fused.output
    assert (tmp_path / "f" / "model.safetensors").is_file()
    exported = runner.invoke(app, ["export-peft", str(trained), str(tmp_path / "p")])
    assert exported.exit_code == 0, exported.output
    imported = runner.invoke(
        app, ["import-peft", str(tmp_path / "p"), str(tmp_path / "b"), "-m", str(tiny_model_dir)]
    )
    assert imported.exit_code == 0, imported.output
    assert (tmp_path / "b" / "adapters.safetensors").is_file()


@pytest.mark.parametrize(
    ("files", "extra", "message"),
    [
        ({}, ["--train", "{d}/nope.jsonl"], "nope.jsonl does not exist"),
        ({"train.jsonl": ""}, [], "train.jsonl is empty"),
        ({"train.jsonl": '{"text": "a"}\n{"text": oops}\n'}, [], "train.jsonl:2: malformed JSON"),
        ({"train.jsonl": '{"text": "a", "id": 3}\n'}, [], "train.jsonl:1: unknown key(s) id"),
        (
            {"train.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n'},
            ["--mask-prompt"],
            "train.jsonl:1: no assistant turn",
        ),
        ({"train.jsonl": '{"text": "hello world"}\n'}, ["--batch-size", "4"], "larger than"),
        ({"train.jsonl": '{"text": "hello world"}\n'}, ["--rank", "0"], "--rank must be"),
        (
            {"train.jsonl": '{"text": "hello world, hello world, hello world"}\n' * 4},
            ["--pack-length", "4"],
            "--pack-length 4 is shorter than the longest training example",
        ),
        ({"train.jsonl": '{"text": "hello world"}\n'}, ["--targets", "q_proj"], "'q_proj'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, files, extra, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    source = [] if any(a == "--train" for a in extra) else ["--data", str(tmp_path)]
    extra = [a.replace("{d}", str(tmp_path)) for a in extra]
    line = one_error_line(lora(tiny_model_dir, *source, "-o", str(out), *extra))
    assert message in line
    assert not out.exists()


def test_config_file_gives_defaults_and_flags_win(tiny_model_dir, data_dir, tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text(
        f"data: {data_dir}\niters: 2\nbatch-size: 2\nmax_seq_len: 64\nrank: 4\n"
        "targets: [qkv_proj, out_proj]\nlr_schedule: cosine\n"
    )
    out = tmp_path / "a"
    args = ["lora", "-m", str(tiny_model_dir), "-c", str(config), "-o", str(out), "--rank", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Trained 2 steps" in result.output
    params = json.loads((out / "adapter_config.json").read_text())["lora_parameters"]
    assert params["rank"] == 2  # the flag, over the file's 4
    assert sorted(params["keys"]) == ["attn.out_proj", "attn.qkv_proj"]
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "train_loss" in r]
    assert steps[-1]["learning_rate"] < 1e-4  # cosine from the file decays to 0 at step 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch_size: 2\nbogus: 1\n", "--config {}: unknown key(s) bogus"),
        ("batch_size: [\n", "{}:2: not valid YAML"),
        ("- 1\n- 2\n", "--config {}: expected a mapping"),
        (None, "cannot read {}"),
        ("iters: " + "9" * 5000 + "\n", "{}: bad JSON value"),
        ("iters: " + "[" * 5000 + "]" * 5000 + "\n", "{}: "),
    ],
)
def test_bad_config_file(tiny_model_dir, data_dir, tmp_path, text, message):
    config = tmp_path / "lora.yaml"
    if text is not None:
        config.write_text(text)
    out = tmp_path / "out"
    line = one_error_line(lora(tiny_model_dir, "--data", str(data_dir), "-o", str(out),
                               "--config", str(config)))  # fmt: skip
    assert message.format(config) in line
    assert not out.exists()


def test_existing_folder_and_resume_with_changed_settings(tiny_model_dir, data_dir, trained):
    base = ["--data", str(data_dir), "-o", str(trained)]
    before = (trained / "adapters.safetensors").read_bytes()
    line = one_error_line(lora(tiny_model_dir, *base))
    assert "already exists" in line and "--resume" in line
    line = one_error_line(lora(tiny_model_dir, *base, "--resume", "--rank", "4", "--lr", "2e-3"))
    assert "--rank was 8, now 4" in line and "--learning-rate was 0.001, now 0.002" in line
    assert (trained / "adapters.safetensors").read_bytes() == before
    fresh = trained.parent / "fresh"
    line = one_error_line(
        lora(tiny_model_dir, "--data", str(data_dir), "-o", str(fresh), "--resume")
    )
    assert "holds no checkpoint" in line and not fresh.exists()


def test_adapters_for_another_model_shape(tiny_model_dir, trained, tmp_path):
    other = make_model_dir(tmp_path / "wide", tiny_model_dir / "tokenizer.model", model_dim=96)
    result = runner.invoke(
        app, ["fuse", "-m", str(other), "--adapter", str(trained), "-o", str(tmp_path / "f")]
    )
    line = one_error_line(result)
    assert "do not fit this model" in line and "lora_a" in line
    assert not (tmp_path / "f").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "nan"
    result = lora(tiny_model_dir, "--data", str(data_dir), "-o", str(out), "--save-every", "1",
                  "--optimizer", "sgd", "--lr", "1e30")  # fmt: skip
    assert result.exit_code == 1
    line = [ln for ln in result.output.splitlines() if ln.startswith("Error:")][0]
    assert "training loss became nan at step 2" in line
    assert "last good checkpoint (step 1)" in line
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1


def test_training_without_validation_data_reports_without_a_best(
    tiny_model_dir, data_dir, tmp_path
):
    out = tmp_path / "a"
    for extra in ([], ["--test"], ["--plot"]):
        args = ["lora", "-m", str(tiny_model_dir), "--train", str(data_dir / "train.jsonl"),
                "-o", str(out), "--iters", "1", "--batch-size", "2", "--max-seq-len", "64",
                "--force", *extra]  # fmt: skip
        result = runner.invoke(app, args)
        if extra == ["--test"]:  # --train FILE has no test.jsonl beside a data folder
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
            continue
        assert result.exit_code == 0, result.output
        assert "Trained 1 steps" in result.output and "best validation" not in result.output
        assert (out / "adapters.safetensors").is_file()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--iters", "0", "--iters must be an integer from 1"),
        ("--epochs", "0", "--epochs must be an integer from 1"),
        ("--learning-rate", "-1", "--learning-rate must be a finite positive number"),
        ("--learning-rate", "nan", "--learning-rate must be a finite positive number"),
        ("--batch-size", "0", "--batch-size must be an integer from 1"),
        ("--warmup", "-3", "--warmup must be an integer from 0"),
        ("--weight-decay", "inf", "--weight-decay must be a number"),
        ("--grad-clip", "0", "--grad-clip must be a positive number"),
        ("--seed", "-1", "--seed must be an integer from 0"),
        ("--dropout", "nan", "--dropout must be in [0, 1)"),
        ("--alpha", "inf", "--alpha must be a finite non-zero number"),
        ("--rank", "100000000", "--rank must be an integer from 1 to 65536"),
        ("--rank", "3000", "--rank 3000 is larger than the widest adapted layer"),
    ],
)
def test_zero_negative_and_absurd_numbers_are_refused_by_name(
    tiny_model_dir, data_dir, tmp_path, flag, value, message
):
    out = tmp_path / "a"
    args = [*FAST, flag, value] if flag != "--epochs" else ["--epochs", value]  # not with --iters
    result = runner.invoke(app, ["lora", "-m", str(tiny_model_dir), "--data", str(data_dir),
                                 "-o", str(out), *args])  # fmt: skip
    assert message in one_error_line(result)
    assert not out.exists()


def test_force_will_not_delete_a_folder_that_is_not_an_adapter_folder(
    tiny_model_dir, data_dir, tmp_path
):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    line = one_error_line(lora(tiny_model_dir, "--data", str(data_dir), "-o", str(project),
                               "--force"))  # fmt: skip
    assert "--force will not replace" in line and "notes.txt" in line
    assert (project / "notes.txt").read_text() == "mine"
