"""GGUF export checked by llama.cpp itself, the two runtimes side by side, and the decode limit.

1. Parity: the trained checkpoint (``../shared/models/openelm-tiny-shakespeare``) and a
   270M-shaped random model are exported with ``export_gguf`` in every outtype and loaded by
   llama.cpp (``llama-cpp-python``). Against our float32 logits: the max relative error over a
   64-token real-text prompt, how many of 32 greedy tokens are identical, and top-1 agreement
   over 512 held-out tokens; then a fused LoRA and base + ``--lora-only`` adapter (trained
   checkpoint, a random non-zero rank-8 adapter on every linear).
2. Side by side: ``bench --compare-llama-cpp`` (our loop vs llama.cpp on the same weights,
   exported to the matching GGUF type, alternating trial by trial) on 270M fp32, 8-bit, 4-bit.
3. Bandwidth: the machine's read rate measured outside MLX (NumPy, one reader process per
   core; also one reader alone) next to the best read rate MLX reaches.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
    OPENBLAS_CORETYPE=SkylakeX python benchmarks/bench_gguf.py --write
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from bench_blas import machine_line, make_folder, replace_section
from mlx.utils import tree_flatten

from mlx_openelm.bandwidth import measure_read_bandwidth
from mlx_openelm.bench import bench, format_bench, measure_bandwidth
from mlx_openelm.export import export_gguf
from mlx_openelm.export.llama_cpp import (
    llama_greedy,
    llama_logits,
    max_rel_error,
    mlx_greedy,
    mlx_logits,
    open_llama,
)
from mlx_openelm.loading import load

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TOKENIZER = SHARED / "data" / "llama2-tokenizer" / "tokenizer.model"
TRAINED = SHARED / "models" / "openelm-tiny-shakespeare"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# Observations from this machine's run, written above each table; edit them with new numbers.
NOTES = {
    "GGUF parity (llama.cpp)": (
        "Every file `export_gguf` wrote, loaded by llama.cpp itself (llama-cpp-python 0.3.36, "
        "built from source with AVX2/AVX-512, no AMX) and compared with our float32 model on "
        "the same tokens (`python benchmarks/bench_gguf.py --only parity`). The prompt is the "
        "first 64 tokens of *Othello* (`valid.jsonl`, never trained on), the top-1 text its "
        "first 512; greedy = how many of 32 greedy tokens after the prompt are identical before "
        "the first difference. f32 is within 2.5e-4..4.5e-4 of ours (the issue's bar: 1e-3) "
        "with all 32 greedy tokens identical; f16/bf16 are within their precision; q8_0 agrees "
        "on the top token 99.4% of the time on the trained model (random weights have flat, "
        "near-tied logits: 97.1%). The trained model's bf16 run differs at the first greedy "
        "token: a near-tie that bf16's 8-bit mantissa flips (its top-1 agreement is 99.4%). "
        "The LoRA checks use a random non-zero rank-8 adapter on every linear of the trained "
        "model (its effect on the logits: 10%): llama.cpp's fused GGUF and base + "
        "`--lora-only` adapter both give our base + adapter to 2e-4.\n\n"
    ),
    "llama.cpp side by side": (
        "`bench --compare-llama-cpp` on the 270M-shaped random model: our loop and llama.cpp "
        "on the same weights, exported to the matching GGUF type (float32 -> F32, 8-bit -> "
        "Q8_0, 4-bit -> Q4_0), alternating trial by trial in one process; llama.cpp with "
        "llama-cpp-python's default threads (decode on cpu_count/2 = 1 thread, prompt on 2), "
        "timed by its own counters; ours with OpenBLAS (SkylakeX). Peak memory: ours is MLX's "
        "peak plus the weights, llama.cpp's the peak RSS above the process before it loaded "
        "(weights mapped in, KV cache, buffers). The machine was shared with other helpers "
        "(load average ~10 on 2 cores): absolute numbers are low and noisy, and llama.cpp's "
        "2-thread prompt pass suffers most (its threads spin at barriers and stall when one is "
        "parked). What this run shows: llama.cpp decodes float32 3.3x faster than MLX (7.0 vs "
        "2.1 tokens/s, 80% vs 24% of the decode limit measured in the same run); our prompt "
        "pass was 8x faster, mostly because llama.cpp's 2-thread prompt pass stalls on a "
        "loaded machine.\n\n"
    ),
    "Decode limit": (
        "Decoding one token reads every weight once, so `read bandwidth / bytes per token` "
        "bounds any runtime. `bench` used to measure that bandwidth through MLX (its best "
        "reduction or gemv), which is bounded by MLX's own CPU kernels, so RESULTS.md and the "
        "README reported float32 decode at ~100% of the limit. Now the bandwidth is measured "
        "outside MLX (`mlx_openelm.bandwidth`: NumPy float32 sums, one reader process per "
        "core, started together, best of 5) and labelled as such in every `bench` report; "
        "MLX's own rate is shown beside it. Measured under load (other helpers' jobs, load "
        "average ~10 on 2 cores), so these are lower bounds; the issue measured 13.9 GB/s for "
        "one reader and ~26 GB/s for two on a quieter machine.\n\n"
    ),
}


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def parity_rows(label: str, folder: Path, model, tokens: list[int], tmp: Path) -> list[str]:
    prompt, held_out = tokens[:64], tokens[:512]
    ours, ours_held = mlx_logits(model, prompt), mlx_logits(model, held_out)
    ours_greedy = mlx_greedy(model, prompt, 32)
    rows = []
    for outtype in OUTTYPES:
        out = tmp / f"{folder.name}-{outtype}.gguf"
        export_gguf(folder, out, outtype=outtype, tokenizer=TOKENIZER, force=True)
        llm = open_llama(out, n_ctx=512, threads=1)
        err = max_rel_error(llama_logits(llm, prompt), ours)
        same = same_prefix(llama_greedy(llm, prompt, 32), ours_greedy)
        top1 = float((llama_logits(llm, held_out).argmax(-1) == ours_held.argmax(-1)).mean())
        size = out.stat().st_size / 1e6
        rows.append(f"| {label} | {outtype} | {size:,.1f} | {err:.2e} | {same}/32 | {top1:.2%} |")
        print(rows[-1], file=sys.stderr, flush=True)
        del llm
        out.unlink()
    return rows


def lora_rows(tokens: list[int], tmp: Path) -> list[str]:
    from mlx_openelm.lora import AdapterSpec, apply_adapters
    from mlx_openelm.lora.adapters import save_adapters

    model, _ = load(TRAINED, tokenizer=TOKENIZER)
    spec = AdapterSpec(rank=8, alpha=16.0, num_layers=4,
                       targets=("qkv_proj", "out_proj", "proj_1", "proj_2"))  # fmt: skip
    mx.random.seed(0)
    config = apply_adapters(model, spec)
    params = tree_flatten(model.trainable_parameters())
    model.load_weights([(k, v + 0.02 * mx.random.normal(v.shape)) for k, v in params], False)
    adapter = save_adapters(model, tmp / "lora", config)
    tuned, _ = load(TRAINED, adapter_path=adapter, tokenizer=TOKENIZER)
    base, _ = load(TRAINED, tokenizer=TOKENIZER)
    prompt = tokens[:64]
    want, base_logits = mlx_logits(tuned, prompt), mlx_logits(base, prompt)
    fused, base_gguf, lora = tmp / "fused.gguf", tmp / "base.gguf", tmp / "lora.gguf"
    export_gguf(TRAINED, fused, adapter=adapter, outtype="f32", tokenizer=TOKENIZER, force=True)
    export_gguf(TRAINED, base_gguf, outtype="f32", tokenizer=TOKENIZER, force=True)
    export_gguf(TRAINED, lora, adapter=adapter, lora_only=True, force=True)
    got_fused = llama_logits(open_llama(fused, n_ctx=128, threads=1), prompt)
    got_lora = llama_logits(
        open_llama(base_gguf, n_ctx=128, threads=1, lora_path=str(lora)), prompt
    )
    checks = [
        ("adapter effect (base vs base + adapter, ours)", base_logits),
        ("fused LoRA GGUF (f32) vs our base + adapter", got_fused),
        ("base GGUF + `--lora-only` GGUF vs our base + adapter", got_lora),
    ]
    return [f"| {what} | {max_rel_error(got, want):.2e} |" for what, got in checks]


def real_text_tokens() -> list[int]:
    from mlx_openelm.tokenizer import Tokenizer

    lines = (SHARED / "data" / "shakespeare" / "valid.jsonl").read_text().splitlines()
    text = " ".join(json.loads(line)["text"] for line in lines[:4])
    return Tokenizer(TOKENIZER).encode(text)


def parity(tmp: Path) -> str:
    tokens = real_text_tokens()
    head = [
        "| model | outtype | GGUF MB | max rel. logit error (64 tokens) | greedy tokens identical "
        "| top-1 agreement (512 tokens) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    model, _ = load(TRAINED, tokenizer=TOKENIZER)
    rows = parity_rows("trained 10.5M", TRAINED, model, tokens, tmp)
    r270 = make_folder(tmp / "r270", "270M", "float32", TOKENIZER)
    model, _ = load(r270)
    rows += parity_rows("random 270M", r270, model, tokens, tmp)
    del model
    lora = ["| check | max rel. logit error |", "| --- | ---: |", *lora_rows(tokens, tmp)]
    return "\n".join(head + rows) + "\n\n" + "\n".join(lora) + "\n"


def side_by_side(tmp: Path) -> str:
    parts = []
    for dtype, (p, g) in (("float32", (64, 16)), ("8-bit", (64, 16)), ("4-bit", (16, 8))):
        if dtype == "8-bit":
            folder = tmp / "r270-8bit"
            if not folder.exists():
                from mlx_openelm.convert import convert

                convert(tmp / "r270", folder, quantize=True, bits=8, group_size=64, quality=False)
        else:
            folder = make_folder(tmp / f"r270-{dtype}", "270M", dtype, TOKENIZER)
        report = bench(folder, p, g, trials=3, compare_llama_cpp=True, measure_limit=True)
        parts.append(f"**{dtype}**\n\n```\n{format_bench(report)}\n```")
        print(parts[-1], file=sys.stderr, flush=True)
    return "\n\n".join(parts) + "\n"


def bandwidth() -> str:
    cores, one = measure_read_bandwidth(), measure_read_bandwidth(readers=1)
    ml = measure_bandwidth()
    return (
        "| read rate measured by | GB/s |\n| --- | ---: |\n"
        f"| {cores.method} | {cores.gbs:.1f} |\n| {one.method} | {one.gbs:.1f} |\n"
        f"| MLX: best of a reduction, per-core reductions, a float32 gemv | {ml['read']:.1f} |\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="Replace the sections in RESULTS.md.")
    ap.add_argument("--only", choices=("parity", "bench", "bandwidth"), help="One part only.")
    a = ap.parse_args()
    sections = {}
    with tempfile.TemporaryDirectory() as tmp:
        if a.only in (None, "bandwidth"):
            sections["Decode limit"] = bandwidth()
        if a.only in (None, "parity"):
            sections["GGUF parity (llama.cpp)"] = parity(Path(tmp))
        if a.only in (None, "bench"):
            if not (Path(tmp) / "r270").exists():
                make_folder(Path(tmp) / "r270", "270M", "float32", TOKENIZER)
            sections["llama.cpp side by side"] = side_by_side(Path(tmp))
    for title, body in sections.items():
        print(f"## {title}\n\n{machine_line()}\n\n{body}")
    if a.write:
        text = RESULTS.read_text()
        for title, body in sections.items():
            text = replace_section(text, title, f"{machine_line()}\n\n{NOTES[title]}{body}")
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
