"""Data-parallel fine-tuning: two local processes under ``mlx.launch`` (ring backend) must train
exactly like one process with the combined batch, and only rank 0 writes."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from lora_helpers import text_data

from mlx_openelm.lora import TrainConfig, finetune

ARGS = ["--iters", "4", "--batch-size", "4", "--max-seq-len", "64", "--val-every", "2",
        "--save-every", "4", "--lr", "1e-3"]  # fmt: skip
PROBE = "import mlx.core as mx; g = mx.distributed.init(strict=True); print(mx.distributed.all_sum(mx.array(1.0)).item())"  # noqa: E501


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    pytest.skip("no two adjacent free local ports for the ring backend")


def launcher() -> str | None:
    """``mlx.launch`` of the running interpreter's environment (whether or not it is on PATH)."""
    beside = Path(sys.executable).parent / "mlx.launch"
    return str(beside) if beside.is_file() else shutil.which("mlx.launch")


def launch(*command: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [launcher(), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1",
           "--starting-port", str(free_port_pair()), "--", sys.executable, *command]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ring_backend() -> None:
    if launcher() is None or not mx.distributed.is_available():
        pytest.skip("mlx.launch or MLX's distributed support is not installed")
    try:
        probe = launch("-c", PROBE, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("the ring backend did not start two local processes within 60 s")
    if probe.returncode != 0 or probe.stdout.split().count("2.0") != 2:
        pytest.skip(f"the ring backend is unavailable here: {probe.stderr.strip()[-300:]}")


def curve(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_the_whole_batch(
    ring_backend, tiny_model_dir, tmp_path
):
    data = text_data(tmp_path / "data", n_train=32, n_valid=8)
    two = tmp_path / "two"
    run = launch("-m", "mlx_openelm.cli", "lora", "-m", str(tiny_model_dir), "--data", str(data),
                 "-o", str(two), *ARGS, timeout=240)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("Trained 4 steps") == 1  # rank 0 reports, rank 1 stays quiet
    config = TrainConfig(iters=4, batch_size=4, max_seq_len=64, val_every=2, save_every=4,
                         learning_rate=1e-3)  # fmt: skip
    finetune(tiny_model_dir, tmp_path / "one", data=data, config=config)
    a, b = curve(tmp_path / "one"), curve(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]  # one writer: no duplicate lines
    for x, y in zip(a, b):
        key = "train_loss" if "train_loss" in x else "val_loss"
        assert y[key] == pytest.approx(x[key], rel=1e-5)
        assert y.get("tokens") == x.get("tokens")  # the whole batch's useful tokens
    one = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    both = mx.load(str(two / "adapters.safetensors"))
    for name, w in one.items():
        # Adam divides by sqrt(v): rounding in a near-zero gradient component (the two runs sum
        # in another order) moves that entry by ~1e-6; a rank training on its half of the batch
        # alone (no all_sum) moves whole tensors by ~lr per step.
        err = np.abs(np.array(both[name]) - np.array(w)).max()
        assert err <= 1e-3 * np.abs(np.array(w)).max(), name
    assert (
        json.loads((two / "checkpoint" / "state.json").read_text())["identity"]["hyperparameters"][
            "processes"
        ]
        == 2
    )
