"""``bench`` (ours vs mlx-lm, decode limit) and ``doctor`` (versions, backend, which BLAS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from typer.testing import CliRunner

from mlx_openelm import doctor
from mlx_openelm.bench import (
    MLX_LM_ROW,
    OUR_ROW,
    BenchReport,
    BenchRow,
    Trial,
    bench,
    format_bench,
    kv_bytes,
    measure_bandwidth,
    no_eos,
    random_prompt,
    weight_bytes,
)
from mlx_openelm.cli import app
from mlx_openelm.loading import load_model
from mlx_openelm.tokenizer import Tokenizer

from tiny import random_weights, tiny_config

runner = CliRunner()
OPENBLAS = doctor.openblas_path()
LINUX = sys.platform.startswith("linux")
needs_openblas = pytest.mark.skipif(
    not (LINUX and OPENBLAS.is_file()), reason=f"Linux with OpenBLAS at {OPENBLAS} only"
)


# --- bench -------------------------------------------------------------------------------------


def test_weight_and_kv_bytes_match_the_arrays(tiny_model_dir):
    model, config = load_model(tiny_model_dir)
    params = sum(v.size for v in random_weights(tiny_config(**config), 0).values())
    assert weight_bytes(model) == 4 * params  # float32, tied embeddings counted once
    cache = make_prompt_cache(model)
    model(mx.array([list(range(1, 20))]), cache=cache)
    stored = sum(
        c.keys[..., : c.offset, :].nbytes + c.values[..., : c.offset, :].nbytes for c in cache
    )
    assert kv_bytes(model, 19) == stored


def test_random_prompt_is_reproducible_and_in_range():
    a, b = random_prompt(100, 50, seed=3), random_prompt(100, 50, seed=3)
    assert a == b and len(a) == 50 and 0 <= min(a) and max(a) < 100
    assert random_prompt(100, 50, seed=4) != a


def test_no_eos_wrapper(tiny_model_dir):
    wrapper = no_eos(Tokenizer.from_folder(tiny_model_dir))
    assert set(wrapper.eos_token_ids) == set()


def test_measure_bandwidth_is_positive():
    bw = measure_bandwidth(megabytes=8, repeats=1)
    assert bw["copy"] > 0 and bw["sum"] > 0 and bw["gemv"] > 0
    assert bw["read"] == max(bw["sum"], bw["gemv"], bw.get("parallel_sum", 0.0))


def test_bench_library_runs_both_rows(tiny_model_dir):
    seen = []
    report = bench(
        tiny_model_dir,
        12,
        5,
        trials=2,
        compare_mlx_lm=True,
        measure_limit=False,
        on_trial=lambda *a: seen.append(a[:2]),
    )
    assert [r.name for r in report.rows] == [OUR_ROW, MLX_LM_ROW]
    # Trials alternate the order: ours first, then mlx-lm first.
    assert seen == [(OUR_ROW, 0), (MLX_LM_ROW, 0), (MLX_LM_ROW, 1), (OUR_ROW, 1)]
    for row in report.rows:
        assert len(row.trials) == 2
        assert all(
            t.generated == 5 and t.prompt_tps > 0 and t.generation_tps > 0 for t in row.trials
        )
        assert all(t.peak_memory_gb * 1e9 >= report.weight_bytes for t in row.trials)
    ours, theirs = (r.summary() for r in report.rows)
    ratio = report.ratio()
    assert ratio["generation_tps"] == pytest.approx(
        ours["generation_tps"] / theirs["generation_tps"]
    )
    assert report.decode_limit_tps is None


def test_decode_limit_and_table():
    row = BenchRow(
        name=OUR_ROW,
        trials=[
            Trial(prompt_tps=100.0, generation_tps=10.0, peak_memory_gb=1.0, generated=8),
            Trial(prompt_tps=300.0, generation_tps=30.0, peak_memory_gb=1.0, generated=8),
        ],
    )
    report = BenchReport(
        model="m",
        prompt_tokens=16,
        generation_tokens=8,
        weight_bytes=2_000_000_000,
        bytes_per_token=2_500_000_000,
        bandwidth_gbs=50.0,
        rows=[row],
    )
    assert report.decode_limit_tps == pytest.approx(20.0)
    s = row.summary()
    assert s["prompt_tps"] == 200.0 and s["prompt_tps_std"] == pytest.approx(
        np.std([100, 300], ddof=1)
    )
    text = format_bench(report)
    assert "200.0 ± 141.4" in text and "20.0" in text and "50.0 GB/s" in text
    assert report.ratio() is None and "ours / mlx-lm" not in text


def test_cli_bench_compare_mlx_lm_prints_both_rows(tiny_model_dir):
    args = ["bench", "-m", str(tiny_model_dir), "-p", "8", "-g", "4", "-n", "1", "--compare-mlx-lm"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(ln.startswith(OUR_ROW) for ln in lines)
    assert any(ln.startswith(MLX_LM_ROW) for ln in lines)
    assert any(ln.startswith("ours / mlx-lm") and ln.rstrip().endswith("x") for ln in lines)
    assert any(ln.startswith("decode limit") for ln in lines)


def test_cli_bench_json(tiny_model_dir):
    result = runner.invoke(
        app, ["bench", "-m", str(tiny_model_dir), "-p", "4", "-g", "2", "-n", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["prompt_tokens"] == 4 and data["generation_tokens"] == 2
    assert [r["name"] for r in data["rows"]] == [OUR_ROW] and data["rows"][0]["trials"] == 2
    assert data["ratio"] is None and data["decode_limit_tps"] > 0


@pytest.mark.parametrize("flag,value", [("-p", "0"), ("-g", "0"), ("-n", "0")])
def test_cli_bench_bad_counts(tiny_model_dir, flag, value):
    result = runner.invoke(app, ["bench", "-m", str(tiny_model_dir), flag, value])
    assert result.exit_code == 1
    lines = result.output.splitlines()  # no blank line either (an empty progress display)
    assert len(lines) == 1 and lines[0].startswith("Error:") and "at least 1" in lines[0]


def test_cli_bench_missing_model(tmp_path):
    result = runner.invoke(app, ["bench", "-m", str(tmp_path / "nope")])
    assert result.exit_code == 1 and result.output.startswith("Error:")


# --- doctor ------------------------------------------------------------------------------------


MAPS = """\
7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6
7f02-7f03 r-xp 00000000 08:01 2 /site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0
7f03-7f04 r--p 00001000 08:01 2 /site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0
7f05-7f06 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so
7f07-7f08 rw-p 00000000 00:00 0
7f09-7f0a r-xp 00000000 08:01 4 /site-packages/mlx_cpu.libs/liblapack-86b2c207.so.3.10.0
"""


def test_mapped_blas_parses_proc_maps():
    assert doctor._mapped_blas(MAPS) == [
        "/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so",
    ]


def test_coretype_hint():
    avx512 = {"avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    assert doctor.coretype_hint("Prescott", avx512) == "SkylakeX"
    assert doctor.coretype_hint("Prescott", {"avx2", "fma", "sse4_2"}) == "Haswell"
    assert doctor.coretype_hint("Prescott", {"sse4_2"}) is None  # nothing safe to force
    assert doctor.coretype_hint("Haswell", avx512) is None  # recognised CPU: leave it alone
    assert doctor.coretype_hint(None, avx512) is None


def test_fast_blas_commands():
    assert doctor.fast_blas_commands(installed=False) == [
        "sudo apt-get install libopenblas0-pthread",
        f"export LD_PRELOAD={OPENBLAS}",
    ]
    assert doctor.fast_blas_commands(installed=True, coretype="Haswell") == [
        f"export LD_PRELOAD={OPENBLAS}",
        "export OPENBLAS_CORETYPE=Haswell",
    ]


def _doctor_json(env_changes: dict[str, str | None], *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE")}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    env.pop("MLX_OPENELM_FAST_BLAS_REEXEC", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_openelm.cli", "doctor", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(not LINUX, reason="the bundled reference BLAS is a Linux mlx[cpu] matter")
def test_doctor_without_preload_reports_reference_blas_and_the_fix():
    r = _doctor_json({})
    assert r["mlx"] == mx.__version__ and r["backend"] in ("CPU", "CUDA")
    assert r["python"].endswith(".".join(map(str, sys.version_info[:3])))
    if "mlx_cpu.libs" not in (r["blas"]["library"] or ""):
        pytest.skip(f"MLX here does not use the wheel's bundled BLAS: {r['blas']}")
    assert r["blas"]["kind"] == "reference" and r["blas"]["config"] is None
    assert f"export LD_PRELOAD={OPENBLAS}" in r["fix"]
    assert ("sudo apt-get install libopenblas0-pthread" in r["fix"]) != OPENBLAS.is_file()


@needs_openblas
def test_doctor_with_preload_reports_openblas():
    r = _doctor_json({"LD_PRELOAD": str(OPENBLAS), "OPENBLAS_CORETYPE": "Prescott"})
    assert r["blas"]["kind"] == "openblas" and r["blas"]["library"] == str(OPENBLAS)
    assert r["blas"]["config"].startswith("OpenBLAS") and r["blas"]["core"] == "Prescott"
    assert "fix" not in r  # OPENBLAS_CORETYPE set by the user: no advice to override it


@needs_openblas
def test_doctor_fast_blas_restarts_with_openblas():
    r = _doctor_json({}, "--fast-blas")
    assert r["blas"]["kind"] == "openblas" and str(OPENBLAS) in r["LD_PRELOAD"]
    assert "fix" not in r


def test_doctor_text_on_this_machine():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for key in ("mlx-openelm", "mlx-lm", "python", "backend", "device"):
        assert any(ln.startswith(key) for ln in result.output.splitlines()), key
    assert mx.__version__ in result.output
    if LINUX:
        assert "BLAS" in result.output


def test_fast_blas_never_replaces_a_process_that_did_not_ask(monkeypatch):
    """In-process (as here under pytest) --fast-blas only explains; it must not exec."""
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("execve called"))
    result = runner.invoke(app, ["doctor", "--fast-blas"])
    assert result.exit_code == 0


class FakeExec:
    def __init__(self):
        self.calls = []

    def __call__(self, path, argv, env):
        self.calls.append((path, list(argv), dict(env)))


@needs_openblas
def test_reexec_sets_preload_and_coretype(monkeypatch):
    monkeypatch.setattr(doctor, "openblas_corename", lambda library=None: "Prescott")
    fake = FakeExec()
    argv = ["python", "-m", "mlx_openelm.cli", "bench", "--fast-blas"]
    avx512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    reason = doctor.reexec_with_openblas(
        argv, env={"LD_PRELOAD": "/x.so"}, execve=fake, flags=avx512
    )
    assert reason == "the restart failed"  # the fake exec returned
    ((path, new_argv, env),) = fake.calls
    assert path == sys.executable and new_argv == argv
    assert env["LD_PRELOAD"] == f"{OPENBLAS} /x.so" and env["OPENBLAS_CORETYPE"] == "SkylakeX"
    assert env["MLX_OPENELM_FAST_BLAS_REEXEC"] == "1"


@needs_openblas
def test_reexec_refuses_when_unsafe_or_needless():
    fake = FakeExec()
    argv = ["mlx-openelm", "doctor", "--fast-blas"]
    done = {"LD_PRELOAD": str(OPENBLAS)}
    assert doctor.reexec_with_openblas(argv, env=done, execve=fake, flags=set()) is None
    reason = doctor.reexec_with_openblas(["pytest", "-q"], env={}, execve=fake, flags=set())
    assert "only a real command line" in reason
    guard = {"MLX_OPENELM_FAST_BLAS_REEXEC": "1"}
    assert "did not take effect" in doctor.reexec_with_openblas(
        argv, env=guard, execve=fake, flags=set()
    )
    assert fake.calls == []


def test_reexec_without_openblas_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "openblas_path", lambda: tmp_path / "libblas.so.3")
    monkeypatch.setattr(sys, "platform", "linux")
    reason = doctor.reexec_with_openblas(
        ["x", "--fast-blas"], env={}, execve=FakeExec(), flags=set()
    )
    assert "sudo apt-get install libopenblas0-pthread" in reason


def test_format_report_paths():
    base = {
        "mlx-openelm": "0.1.0",
        "mlx": "0.32.4",
        "mlx-lm": "0.32.2",
        "python": "CPython 3.11.7",
        "os": "Linux",
        "machine": "x86_64",
        "cpu_count": 2,
        "backend": "CPU",
        "default_device": "Device(cpu, 0)",
        "system_memory_gb": 16.0,
        "device": {},
        "LD_PRELOAD": None,
        "OPENBLAS_CORETYPE": None,
    }
    blas = {
        "kind": "reference",
        "library": "/l/libblas.so",
        "config": None,
        "core": None,
        "loaded": [],
    }
    text = doctor.format_report(
        {**base, "blas": blas, "fix": ["export A=1"], "fix_reason": "Slow."}
    )
    assert "x86_64, 2 CPUs, 16.0 GB system RAM" in text
    assert "BLAS              reference: /l/libblas.so" in text and "    export A=1" in text
    metal = {**base, "backend": "Metal", "device_memory_gb": 68.7, "device": {"device_name": "M2"}}
    assert "M2, 68.7 GB" in doctor.format_report(metal) and "BLAS" not in doctor.format_report(
        metal
    )
