"""Conversion time and peak memory, ours vs mlx-lm, on the same random HF checkpoint.

A random float32 OpenELM checkpoint in Hugging Face layout (``config.json``,
``model.safetensors``, the Llama-2 ``tokenizer.model`` that ``mlx_lm.convert`` needs) is written
once, tensor by tensor, into ``benchmarks/out/``. Then each converter turns it into a float16 MLX
folder (and a 4-bit group-64 one) in a fresh subprocess: ours through the real CLI
(``mlx-openelm convert``, which also hashes the source and, when quantizing, skips the quality
probe with ``--no-quality`` to time the same work), mlx-lm through ``mlx_lm.convert(hf_path=...,
mlx_path=...)`` on the local folder. Wall time and peak RSS (GNU time's maximum resident set
size of the whole process: interpreter, imports, everything) are measured per run; runs
alternate ours / mlx-lm so background load hits both alike, and the table reports medians.
The two outputs are compared tensor by tensor (they must be bit-identical).

    python benchmarks/bench_convert.py                      # 270M shape, 3 rounds
    python benchmarks/bench_convert.py --size 1_1B --rounds 1 --write   # the 4.3 GB goal
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten

import mlx_openelm
from mlx_openelm.config import ModelArgs
from mlx_openelm.folder import write_safetensors
from mlx_openelm.model import Model
from mlx_openelm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"
SECTION = "## Convert"

MLX_LM = "from mlx_lm import convert; import sys; convert(hf_path=sys.argv[1], mlx_path=sys.argv[2], dtype='float16', quantize=sys.argv[3] == 'q')"  # noqa: E501


def make_source(folder: Path, size: str, layers: int | None) -> Path:
    """A random float32 HF folder in ``size``'s shape, written one tensor at a time."""
    if (folder / "model.safetensors").is_file():
        return folder
    args = ModelArgs.from_preset(size, **({"num_transformer_layers": layers} if layers else {}))
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = {k: v.shape for k, v in tree_flatten(Model(args).parameters())}
    mx.random.seed(0)
    tensors = ((k, mx.random.normal(s) * 0.02) for k, s in shapes.items())
    write_safetensors(tmp, tensors)
    config = {**args.to_dict(), "torch_dtype": "float32"}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    Tokenizer(TOKENIZER).save(tmp)
    tmp.rename(folder)
    return folder


def run_one(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (MB) of one subprocess, measured by GNU time.

    (``wait4``'s ``ru_maxrss`` would not do: a forked child starts with its parent's high-water
    mark, and this parent holds both outputs in memory to compare them.)
    """
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        start = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"{cmd[:4]} failed:\n{proc.stderr[-3000:]}")
        return {"seconds": seconds, "rss_mb": int(rss.read().split()[-1]) / 1024}


def commands(src: Path, out: Path, quantize: bool) -> dict[str, list[str]]:
    ours = [sys.executable, "-m", "mlx_openelm.cli", "convert", str(src), str(out / "ours")]
    ours += ["--dtype", "float16"] + (["-q", "--no-quality"] if quantize else [])
    theirs = [sys.executable, "-c", MLX_LM, str(src), str(out / "mlx-lm"), "q" if quantize else "-"]
    return {"ours": ours, "mlx-lm": theirs}


def identical(a: Path, b: Path) -> bool:
    """Same tensor names, dtypes and bytes in both folders."""
    wa, wb = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    if set(wa) != set(wb):
        return False
    return all(wa[k].dtype == wb[k].dtype and mx.array_equal(wa[k], wb[k]).item() for k in wa)


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 1e6


def bench(src: Path, work: Path, quantize: bool, rounds: int) -> dict:
    out = work / "converted"
    runs: dict[str, list[dict]] = {"ours": [], "mlx-lm": []}
    order = ["ours", "mlx-lm"]
    for r in range(rounds):
        for tool in order if r % 2 == 0 else order[::-1]:
            shutil.rmtree(out / tool, ignore_errors=True)
            runs[tool].append(run_one(commands(src, out, quantize)[tool]))
    return {
        "runs": runs,
        "sizes": {tool: folder_mb(out / tool) for tool in runs},
        "identical": identical(out / "ours", out / "mlx-lm"),
    }


def table(src: Path, results: dict[str, dict]) -> str:
    src_mb = folder_mb(src)
    lines = [
        f"Source: {src_mb:,.0f} MB float32 safetensors ({src.name}).",
        "",
        "| output | tool | wall s (median) | peak RSS MB (median) | output MB | time vs mlx-lm | "
        "RSS vs mlx-lm | runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, res in results.items():
        med = {
            tool: {k: statistics.median(r[k] for r in rows) for k in ("seconds", "rss_mb")}
            for tool, rows in res["runs"].items()
        }
        for tool in ("ours", "mlx-lm"):
            m, ref = med[tool], med["mlx-lm"]
            lines.append(
                f"| {kind} | {tool} | {m['seconds']:.1f} | {m['rss_mb']:,.0f} | "
                f"{res['sizes'][tool]:,.0f} | {m['seconds'] / ref['seconds']:.2f}x | "
                f"{m['rss_mb'] / ref['rss_mb']:.2f}x | {len(res['runs'][tool])} |"
            )
        lines.append(f"| {kind} | outputs bit-identical | {res['identical']} | | | | | |")
    return "\n".join(lines)


INTRO = (
    f"{SECTION}\n\n"
    "`benchmarks/bench_convert.py`: the same random float32 HF checkpoint converted to float16 "
    "(and to 4-bit, group 64) by `mlx-openelm convert` and by `mlx_lm.convert`, each run in a "
    "fresh process, alternating. Peak RSS is the whole process (GNU time's %M), interpreter and "
    "imports included: importing mlx-lm (which pulls in transformers) costs ~260 MB by itself, "
    "and both tools import it. Ours also hashes the source (sha256, recorded in config.json); "
    "quantized runs of ours skip the quality probe (`--no-quality`) so both do the same work. "
    "Conversion does no matmuls, so BLAS does not matter. The machine was shared with other "
    "jobs: wall times are noisy (medians shown), RSS much less so.\n"
)


def header(args: argparse.Namespace) -> str:
    return (
        f"### {args.size} shape" + (f", {args.layers} layers" if args.layers else "") + "\n\n"
        f"`python benchmarks/bench_convert.py --size {args.size}"
        + (f" --layers {args.layers}" if args.layers else "")
        + f" --rounds {args.rounds}` on {datetime.date.today()}: {platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, "
        f"mlx {mx.__version__} ({mx.default_device()}), mlx-lm {mlx_lm.__version__}, "
        f"mlx-openelm {mlx_openelm.__version__}.\n"
    )


def write_section(sub: str, text: str) -> None:
    """Put ``text`` as subsection ``sub`` of ``## Convert`` in RESULTS.md (replacing it)."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION not in old:
        old = old.rstrip("\n") + "\n\n" + INTRO
    start = old.index(SECTION)
    end = old.find("\n## ", start + len(SECTION))
    end = len(old) if end < 0 else end + 1
    section = old[start:end].rstrip("\n") + "\n"
    if sub in section:
        s0 = section.index(sub)
        s1 = section.find("\n### ", s0 + len(sub))
        section = section[:s0] + (section[s1 + 1 :] if s1 >= 0 else "")
    section = section.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    rest = old[end:]
    RESULTS.write_text(old[:start] + section + ("\n" + rest if rest else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="270M", help="270M, 450M, 1_1B or 3B shape")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-quantized", action="store_true", help="skip the 4-bit runs")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out" / "convert")
    parser.add_argument("--write", action="store_true", help=f"add/replace {SECTION} in RESULTS.md")
    args = parser.parse_args()
    if not TOKENIZER.is_file():
        sys.exit(f"needs the Llama-2 tokenizer at {TOKENIZER} (../shared)")
    name = f"src-{args.size}" + (f"-{args.layers}L" if args.layers else "")
    started = time.perf_counter()
    src = make_source(args.workdir / name, args.size, args.layers)
    print(f"source ready in {time.perf_counter() - started:.0f} s: {src}", file=sys.stderr)
    results = {"float16": bench(src, args.workdir, False, args.rounds)}
    if not args.no_quantized:
        results["4-bit g64"] = bench(src, args.workdir, True, args.rounds)
    text = header(args) + "\n" + table(src, results)
    print(text)
    if args.write:
        write_section(text.splitlines()[0], text)


if __name__ == "__main__":
    main()
