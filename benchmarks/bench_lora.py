"""LoRA fine-tuning throughput: ours (packed rows) vs mlx-lm's trainer, same model/data/rank.

Question: on WikiSQL with a 270M-shaped OpenELM (random weights), how many *useful* tokens per
second (non-padding input positions) does each trainer process, and at what peak memory?

Both sides get the same model folder, the same Llama-2 tokenization of ``../shared/data/wikisql``
(BOS + text + EOS), LoRA of rank ``--rank`` on the same four linears of all 16 layers
(``scale = alpha / rank`` on both), Adam at the same learning rate and ``--batch-size``
sequences per step. mlx-lm pads each batch to a multiple of 32 (its length sort is a no-op for
text data: ``CacheDataset.itemlen`` measures the raw record dict, so batches follow file order);
we pack examples into rows of ``--seq-len`` tokens.

Rows: mlx-lm as shipped; mlx-lm with the glibc ``malloc`` settings ours applies to itself
(``fastmath.keep_freed_memory``, given to mlx-lm as ``MALLOC_*`` variables) — to show how much of
the gap that setting alone is; ours with as many rows; ours with half the rows (about mlx-lm's
tokens per step, hence its memory); and that again with MLX's own ``exp``
(``MLX_OPENELM_FAST_MATH=0``) — to show what the CPU polynomial exp is worth. Each measurement
runs in a fresh process (so peak memory is its own), configurations alternate, and the table
shows medians over ``--repeats`` runs of ``--steps`` timed steps after ``--warmup`` untimed ones
(compilation). Timings are reported per wall second and per CPU second (the latter is steadier
on a shared machine). "peak" is MLX's peak of live arrays (``mx.get_peak_memory``, what both
trainers report); "max RSS" is the whole process's resident peak.

    python benchmarks/bench_lora.py                      # OpenBLAS preloaded (Linux CPU)
    python benchmarks/bench_lora.py --blas plain         # MLX's bundled reference BLAS
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKISQL = SHARED / "data" / "wikisql"
TOKENIZER = SHARED / "data" / "llama2-tokenizer" / "tokenizer.model"


def make_model(folder: Path) -> Path:
    """A 270M-shaped OpenELM folder with MLX's default random init, float32."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_openelm.config import ModelArgs
    from mlx_openelm.folder import write_model_folder
    from mlx_openelm.model import Model
    from mlx_openelm.tokenizer import Tokenizer

    mx.random.seed(0)
    args = ModelArgs.from_preset("270M")
    model = Model(args)
    write_model_folder(
        folder, args.to_dict(), tree_flatten(model.parameters()), Tokenizer(TOKENIZER)
    )
    return folder


def mark(tokens: int) -> tuple[float, float, int]:
    return time.perf_counter(), time.process_time(), tokens


def marks_to_result(marks: list[tuple[float, float, int]], warmup: int, steps: int) -> dict:
    """Throughput of steps ``warmup + 1 … warmup + steps``.

    ``marks[i]`` = (wall time, CPU time, useful tokens) when step i + 1 ended; ``warmup ≥ 1``.
    """
    window = marks[warmup - 1 : warmup + steps]
    wall, cpu = window[-1][0] - window[0][0], window[-1][1] - window[0][1]
    tokens = sum(t for _, _, t in window[1:])
    return {
        "tokens": tokens,
        "tokens_per_second": tokens / wall,
        "tokens_per_cpu_second": tokens / cpu,
    }


def run_ours(model_dir: Path, a: argparse.Namespace) -> dict:
    import mlx.core as mx

    from mlx_openelm.loading import load
    from mlx_openelm.lora import AdapterSpec, StepReport, TrainConfig, train
    from mlx_openelm.lora.data import load_datasets

    model, tok = load(model_dir)
    data = load_datasets(tok, data_dir=WIKISQL, max_seq_len=a.seq_len)
    spec = AdapterSpec(rank=a.rank, alpha=a.alpha)
    config = TrainConfig(iters=a.warmup + a.steps, batch_size=a.batch_size, max_seq_len=a.seq_len,
                         pack=True, pack_length=a.seq_len, optimizer="adam", learning_rate=1e-5,
                         val_every=10**9, save_every=10**9)  # fmt: skip
    marks: list[tuple[float, float, int]] = []

    def on_event(e: object) -> None:
        if isinstance(e, StepReport):
            marks.append(mark(e.tokens))

    mx.reset_peak_memory()
    with tempfile.TemporaryDirectory() as tmp:
        train(model, data.train, None, spec, config, Path(tmp) / "a", callback=on_event)
    peak = mx.get_peak_memory()
    return {**marks_to_result(marks, a.warmup, a.steps), "peak": peak}


def run_mlx_lm(model_dir: Path, a: argparse.Namespace) -> dict:
    import types

    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tok = load(str(model_dir))
    train_set, _, _ = load_local_dataset(WIKISQL, tok, types.SimpleNamespace(mask_prompt=False))
    model.freeze()
    params = {"rank": a.rank, "scale": a.alpha / a.rank, "dropout": 0.0}
    linear_to_lora_layers(model, len(model.layers), params)
    starts: list[tuple[float, float, int]] = []

    def counting_batches(*args, **kwargs):
        for batch, lengths in iterate_batches(*args, **kwargs):
            useful = int((lengths[:, 1] - 1).sum().item())  # non-padding input positions
            starts.append(mark(useful))
            yield batch, lengths

    np.random.seed(0)  # mlx-lm draws its batch order from NumPy's global generator
    mx.reset_peak_memory()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(batch_size=a.batch_size, iters=a.warmup + a.steps + 1,
                            steps_per_report=10**9, steps_per_eval=10**9, steps_per_save=10**9,
                            adapter_file=str(Path(tmp) / "adapters.safetensors"))  # fmt: skip
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            train(model, optim.Adam(learning_rate=1e-5), CacheDataset(train_set), None, args,
                  iterate_batches=counting_batches)  # fmt: skip
    peak = mx.get_peak_memory()
    # starts[k] is taken when step k + 1 starts, i.e. when step k ends.
    ends = [(*starts[k][:2], starts[k - 1][2]) for k in range(1, len(starts))]
    return {**marks_to_result(ends, a.warmup, a.steps), "peak": peak}


def worker(a: argparse.Namespace) -> None:
    import resource

    run = run_ours if a.worker.startswith("ours") else run_mlx_lm
    result = run(Path(a.model), a)
    result["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    Path(a.out).write_text(json.dumps(result))


def spawn(kind: str, batch_size: int, seq_len: int, model_dir: Path, a: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if kind == "ours-mlx-exp":
        env["MLX_OPENELM_FAST_MATH"] = "0"
    if kind == "mlx-lm-malloc":  # what fastmath.keep_freed_memory() sets in our process
        from mlx_openelm.fastmath import MMAP_THRESHOLD, TRIM_THRESHOLD

        env.update(
            MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD)
        )
    if a.blas == "openblas":  # what --fast-blas does: preload, and name the kernels if needed
        from mlx_openelm.doctor import fast_coretype, openblas_path

        env["LD_PRELOAD"] = str(openblas_path())
        coretype = fast_coretype()  # None when OPENBLAS_CORETYPE is set already
        if coretype:
            env["OPENBLAS_CORETYPE"] = coretype
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model_dir),
               "--out", f.name, "--batch-size", str(batch_size), "--rank", str(a.rank),
               "--alpha", str(a.alpha), "--seq-len", str(seq_len), "--steps", str(a.steps),
               "--warmup", str(a.warmup)]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)
        return json.loads(Path(f.name).read_text())


def configs(a: argparse.Namespace) -> list[tuple[str, str, int, int]]:
    """(label, worker, batch size, row length): mlx-lm as shipped; mlx-lm with our malloc
    settings; ours with as many rows; ours with half the rows (about mlx-lm's tokens
    per step); that again with MLX's own exp (``MLX_OPENELM_FAST_MATH=0``)."""
    b, s, h = a.batch_size, a.seq_len, max(a.batch_size // 2, 1)
    return [
        (f"mlx-lm, batch {b} (padded)", "mlx-lm", b, s),
        (f"mlx-lm, batch {b}, our malloc settings", "mlx-lm-malloc", b, s),
        (f"ours, batch {b} x {s} packed", "ours", b, s),
        (f"ours, batch {h} x {s} packed", "ours", h, s),
        (f"ours, batch {h} x {s}, MLX exp", "ours-mlx-exp", h, s),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seq-len", type=int, default=256, help="our packed row length")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blas", choices=["openblas", "plain"], default="openblas")
    p.add_argument("--model", help="model folder to reuse (written there if missing)")
    p.add_argument("--worker", choices=["ours", "ours-mlx-exp", "mlx-lm", "mlx-lm-malloc"],
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if not (WIKISQL / "train.jsonl").is_file() or not TOKENIZER.is_file():
        sys.exit(f"needs {WIKISQL} and {TOKENIZER}")
    from mlx_openelm.doctor import openblas_path

    if a.blas == "openblas" and not openblas_path().is_file():
        sys.exit(f"OpenBLAS not at {openblas_path()}; use --blas plain")
    runs: dict[str, list[dict]] = {label: [] for label, *_ in configs(a)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(a.model or Path(tmp) / "openelm-270M-random")
        if not (model_dir / "config.json").is_file():
            make_model(model_dir)
        for r in range(a.repeats):
            order = configs(a) if r % 2 == 0 else configs(a)[::-1]  # alternate who goes first
            for label, kind, batch_size, seq_len in order:
                runs[label].append(spawn(kind, batch_size, seq_len, model_dir, a))
                last = runs[label][-1]
                print(f"  run {r + 1}: {label:<30} {last['tokens_per_second']:6.1f} tok/s "
                      f"{last['tokens_per_cpu_second']:6.1f} tok/cpu-s "
                      f"{last['peak'] / 2**30:5.2f} GiB {last['rss'] / 2**30:5.2f} GiB RSS",
                      flush=True)  # fmt: skip
    report(runs, a)


def padding_efficiency(a: argparse.Namespace) -> dict[str, float]:
    """Useful / computed positions over one epoch of the train set, per configuration."""
    import numpy as np

    from mlx_openelm.lora.batching import epoch_order, make_batch, plan_rows, row_lengths
    from mlx_openelm.lora.data import encode_file
    from mlx_openelm.tokenizer import Tokenizer

    tok = Tokenizer(TOKENIZER)
    out = {}
    for label, kind, b, s in configs(a):
        examples = encode_file(
            WIKISQL / "train.jsonl", tok, 2048 if kind.startswith("mlx-lm") else s
        ).examples
        useful = computed = 0
        if kind.startswith("mlx-lm"):  # file order (see the module docstring), padded to 32k + 1
            n = np.array([len(e.tokens) for e in examples])
            for i in range(0, len(n) - b + 1, b):
                useful += int((n[i : i + b] - 1).sum())
                computed += b * 32 * -(-int(n[i : i + b].max()) // 32)
        else:
            rows = plan_rows(examples, s, pack=True)
            order = epoch_order(len(rows), 0, 0, row_lengths(examples, rows), b)
            for i in range(0, len(rows) - b + 1, b):
                batch = make_batch(examples, [rows[j] for j in order[i : i + b]], s, True)
                useful, computed = useful + batch.num_tokens, computed + batch.inputs.size
        out[label] = useful / computed
    return out


def report(runs: dict[str, list[dict]], a: argparse.Namespace) -> None:
    def median(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[label])

    base = configs(a)[0][0]
    print(
        f"\nWikiSQL train, OpenELM-270M shape (random), fp32, LoRA r={a.rank} on all 16 layers, "
        f"BLAS: {a.blas}; medians of {a.repeats} runs x {a.steps} steps after {a.warmup}"
    )
    vs = "vs mlx-lm"
    efficiency = padding_efficiency(a)
    print(f"| trainer | useful/computed | useful tok/s | {vs} | useful tok / CPU-s | {vs} "
          f"| peak GiB | {vs} | max RSS GiB |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label in runs:
        cells = []
        for key, fmt in (
            ("tokens_per_second", ".1f"),
            ("tokens_per_cpu_second", ".1f"),
            ("peak", ".2f"),
        ):
            value, ratio = median(label, key), median(label, key) / median(base, key)
            cells += [f"{value / (2**30 if key == 'peak' else 1):{fmt}}", f"{ratio:.2f}x"]
        cells.append(f"{median(label, 'rss') / 2**30:.2f}")
        print(f"| {label} | {efficiency[label]:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
