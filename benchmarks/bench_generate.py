"""Generation speed, ours vs mlx-lm, on the same converted 270M-shaped random model.

For fp32, bf16 and 4-bit (group 64) folders written by our folder writer, this loads the folder
twice: with ``mlx_openelm.load`` (our model, our tokenizer) driven by
``mlx_openelm.stream_generate``, and with ``mlx_lm.load`` (mlx-lm's own OpenELM class and
tokenizer) driven by ``mlx_lm.stream_generate``. Both decode greedily from the same random prompt
for a fixed number of tokens (EOS is ignored so every run has the same length) and must produce
the same tokens. Runs alternate (ours, mlx-lm, mlx-lm, ours, …) after one warm-up each, so
background load from other processes hits both alike; the table reports medians.

Peak memory is MLX's peak during the run, above what was allocated before it, plus the model's own
weight bytes: what a process holding only that model would see (both models are loaded at once).

``--compile`` adds a third row: ours with an ``mx.compile``-d SwiGLU (``silu(gate) * up`` fused into
one kernel). A compiled whole decode step is not possible over mlx-lm's KV cache, whose shapes
grow every step (each new shape would retrace).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/bench_generate.py --write     # replace "## Generation" in RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import mlx_openelm
from mlx_openelm import model as openelm_model
from mlx_openelm.bench import no_eos, run_trial, weight_bytes
from mlx_openelm.config import ModelArgs
from mlx_openelm.folder import write_model_folder
from mlx_openelm.model import Model
from mlx_openelm.tokenizer import ZEPHYR_CHAT_TEMPLATE, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"
SECTION = "## Generation"


def make_folder(path: Path, dtype: str, tokenizer: Tokenizer) -> Path:
    """The 270M preset with MLX's default random init, in fp32, bf16 or 4-bit."""
    args = ModelArgs.from_preset("270M")
    mx.random.seed(0)
    model = Model(args)
    config = args.to_dict()
    if dtype == "bf16":
        model.set_dtype(mx.bfloat16)
    if dtype == "4-bit":
        nn.quantize(model, group_size=64, bits=4)
        config["quantization"] = {"group_size": 64, "bits": 4}
    write_model_folder(path, config, tree_flatten(model.parameters()), tokenizer=tokenizer)
    return path


def run(stream, model, tokenizer, prompt: list[int], n: int) -> dict:
    """One timed run through ``mlx-openelm bench``'s own trial, keeping the tokens."""
    tokens: list[int] = []
    trial = run_trial(
        stream, model, weight_bytes(model), lambda r: tokens.append(r.token),
        tokenizer=tokenizer, prompt=prompt, max_tokens=n,
    )  # fmt: skip
    return {
        "prompt_tps": trial.prompt_tps,
        "gen_tps": trial.generation_tps,
        "peak_gb": trial.peak_memory_gb,
        "tokens": tokens,
    }


@partial(mx.compile, shapeless=True)
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class CompiledMLP(openelm_model.MLP):
    """Our MLP with the SwiGLU glue compiled (the --compile experiment)."""

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.proj_1(x), 2, axis=-1)
        return self.proj_2(_swiglu(gate, up))


def compiled_copy(folder: Path):
    model, tok = mlx_openelm.load(folder)
    for layer in model.layers:
        layer.ffn.__class__ = CompiledMLP  # same module and weights, compiled glue
    return model, tok


def bench_dtype(folder: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    import mlx_lm

    ours, our_tok = mlx_openelm.load(folder)
    theirs, their_tok = mlx_lm.load(str(folder))
    runners = {
        "ours": (mlx_openelm.stream_generate, ours, no_eos(our_tok)),
        "mlx-lm": (mlx_lm.stream_generate, theirs, no_eos(their_tok)),
    }
    if args.compile:
        compiled, tok = compiled_copy(folder)
        runners["ours + compiled SwiGLU"] = (
            mlx_openelm.stream_generate,
            compiled,
            no_eos(tok),
        )
    prompt = mx.random.randint(3, 32000, (args.prompt_tokens,), key=mx.random.key(1)).tolist()
    for stream, model, tok in runners.values():  # warm-up
        run(stream, model, tok, prompt, 4)
    results: dict[str, list[dict]] = {name: [] for name in runners}
    names = list(runners)
    for i in range(args.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            stream, model, tok = runners[name]
            results[name].append(run(stream, model, tok, prompt, args.gen_tokens))
    same = all(r["tokens"] == results["mlx-lm"][0]["tokens"] for rs in results.values() for r in rs)
    models = {name: model for name, (_, model, _) in runners.items()}
    steps = forward_steps(models, prompt, args.steps) if args.steps else None
    return {"rows": results, "same_tokens": same, "steps": steps}


def forward_steps(models: dict[str, nn.Module], prompt: list[int], steps: int) -> dict:
    """Model forward passes only, interleaved pass by pass: one prefill of ``prompt`` and one
    greedy decode step per model per round, alternating the order. Background load then hits
    every model alike, which whole alternating runs on a busy machine cannot promise."""
    from mlx_lm.models.cache import make_prompt_cache

    names = list(models)
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in names}
    caches = {n: make_prompt_cache(models[n]) for n in names}
    ys = {}
    for i in range(steps):
        for n in names if i % 2 == 0 else names[::-1]:
            if i < 3:  # a fresh prefill each of the first rounds (the last one is kept)
                caches[n] = make_prompt_cache(models[n])
                start = time.perf_counter()
                logits = models[n](mx.array([prompt]), cache=caches[n])
                ys[n] = mx.argmax(logits[:, -1], axis=-1)
                mx.eval(ys[n], [c.state for c in caches[n]])
                times[n]["prefill"].append(len(prompt) / (time.perf_counter() - start))
                continue
            start = time.perf_counter()
            logits = models[n](ys[n][:, None], cache=caches[n])
            ys[n] = mx.argmax(logits[:, -1], axis=-1)
            mx.eval(ys[n])
            times[n]["decode"].append(1 / (time.perf_counter() - start))
    return times


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def spread(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{min(values):.1f}-{max(values):.1f}"


def table(all_results: dict[str, dict]) -> str:
    lines = [
        "| dtype | implementation | prompt tok/s | decode tok/s | peak memory GB "
        "| prompt ratio | decode ratio | memory ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dtype, res in all_results.items():
        base = res["rows"]["mlx-lm"]
        for name, rows in res["rows"].items():
            ratios = [
                median(rows, k) / median(base, k) for k in ("prompt_tps", "gen_tps", "peak_gb")
            ]
            lines.append(
                f"| {dtype} | {name} | {median(rows, 'prompt_tps'):.1f} "
                f"({spread(rows, 'prompt_tps')}) | {median(rows, 'gen_tps'):.2f} "
                f"({spread(rows, 'gen_tps')}) | {median(rows, 'peak_gb'):.3f} | "
                + " | ".join(f"{r:.2f}×" for r in ratios)
                + " |"
            )
    return "\n".join(lines)


def steps_table(all_results: dict[str, dict]) -> str:
    lines = [
        "| dtype | implementation | prefill tok/s | decode tok/s | prefill ratio | decode ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for dtype, res in all_results.items():
        steps = res["steps"]
        base = {k: statistics.median(v) for k, v in steps["mlx-lm"].items()}
        for name, t in steps.items():
            p, d = statistics.median(t["prefill"]), statistics.median(t["decode"])
            lines.append(
                f"| {dtype} | {name} | {p:.1f} | {d:.2f} | {p / base['prefill']:.2f}× "
                f"| {d / base['decode']:.2f}× |"
            )
    return "\n".join(lines)


def write_section(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION in old:
        start = old.index(SECTION)
        nxt = old.find("\n## ", start + len(SECTION))
        old = old[:start].rstrip("\n") + ("\n\n" + old[nxt + 1 :] if nxt >= 0 else "\n")
    RESULTS.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16,4-bit")
    parser.add_argument("--compile", action="store_true", help="add the mx.compile experiment")
    parser.add_argument("--steps", type=int, default=0, help="also interleave forward passes")
    parser.add_argument("--write", action="store_true", help=f"replace {SECTION} in RESULTS.md")
    args = parser.parse_args()
    if not TOKENIZER.is_file():
        sys.exit(f"needs the Llama-2 tokenizer at {TOKENIZER} (../shared)")
    tokenizer = Tokenizer(TOKENIZER, chat_template=ZEPHYR_CHAT_TEMPLATE)
    blas = os.environ.get("LD_PRELOAD") or "reference BLAS (as installed)"
    started = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            folder = make_folder(Path(tmp) / dtype, dtype, tokenizer)
            results[dtype] = bench_dtype(folder, args)
            print(f"{dtype}: done ({time.time() - started:.0f} s)", file=sys.stderr)
    body = table(results)
    if args.steps:
        body += (
            f"\n\nForward passes only, interleaved pass by pass ({args.steps - 3} decode steps "
            "after 3 prefills per model, medians):\n\n" + steps_table(results)
        )
    same = all(r["same_tokens"] for r in results.values())
    text = (
        f"{SECTION}\n\n"
        f"`python benchmarks/bench_generate.py` — 270M-shaped random model, prompt "
        f"{args.prompt_tokens} tokens, {args.gen_tokens} generated greedily, {args.rounds} "
        f"alternating rounds (median, min-max in brackets), {os.cpu_count()} CPU cores, "
        f"BLAS: `{blas}`, mlx {mx.__version__}. Ratio = ours / mlx-lm (higher is better for "
        f"tok/s, lower for memory). Same tokens from both: {'yes' if same else 'NO'}.\n\n"
        f"{body}\n"
    )
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
