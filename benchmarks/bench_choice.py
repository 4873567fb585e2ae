"""Scoring multiple choice: run the context once (KV cache) or once per choice?

``mlx_openelm.evaluate`` prefills each question's context once into a KV cache, copies it per
choice and runs all choices in one right-padded batch. The alternatives:

- ``padded``: one batch of ``context + choice`` rows, right-padded (the context runs once per
  choice);
- ``separate``: one forward per choice (the context runs once per choice, no padding).

All three must give the same log-likelihoods; this script checks that and times them on a random
OpenELM of a real size with HellaSwag-like shapes (a context of ``--context`` tokens, four choices
of ``--choice`` tokens each).

    python benchmarks/bench_choice.py [--preset 270M] [--context 96] [--choice 24] [-q 8]
    python benchmarks/bench_choice.py --write     # also replace ## Choice scoring in RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np
from bench_blas import RESULTS, machine_line, replace_section

from mlx_openelm.config import ModelArgs
from mlx_openelm.evaluate import _continuation_logprobs
from mlx_openelm.model import Model


def blas_line() -> str:
    from mlx_openelm.doctor import blas_info

    info = blas_info()
    return info.kind + (f" ({info.core} kernels)" if info.core else "")


def padded(model, context: list[int], conts: list[list[int]]) -> list[float]:
    rows = [context + c for c in conts]
    longest = max(len(r) for r in rows)
    tokens = mx.array([r + [0] * (longest - len(r)) for r in rows])
    logits = model(tokens[:, :-1]).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    pos = mx.arange(longest - 1)[None]
    start, end = len(context) - 1, mx.array([len(r) - 1 for r in rows])[:, None]
    return (picked * ((pos >= start) & (pos < end))).sum(axis=-1).tolist()


def separate(model, context: list[int], conts: list[list[int]]) -> list[float]:
    return [padded(model, context, [c])[0] for c in conts]


def cached(model, context: list[int], conts: list[list[int]]) -> list[float]:
    return _continuation_logprobs(model, context, conts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="270M")
    ap.add_argument("--context", type=int, default=96)
    ap.add_argument("--choice", type=int, default=24)
    ap.add_argument("-q", type=int, default=8, help="questions per timing")
    ap.add_argument("-n", type=int, default=3, help="rounds")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    args = ModelArgs.from_preset(a.preset)
    mx.random.seed(0)
    model = Model(args)
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    questions = [
        (
            rng.integers(3, args.vocab_size, a.context).tolist(),
            [rng.integers(3, args.vocab_size, a.choice - k).tolist() for k in range(4)],
        )
        for _ in range(a.q)
    ]
    methods = {"cached (ours)": cached, "padded": padded, "separate": separate}
    reference = [separate(model, c, ch) for c, ch in questions[:2]]
    for name, fn in methods.items():
        got = [fn(model, c, ch) for c, ch in questions[:2]]
        np.testing.assert_allclose(got, reference, rtol=1e-4, err_msg=name)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(a.n):
        for name, fn in list(methods.items())[:: 1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            for c, ch in questions:
                fn(model, c, ch)
            times[name].append(a.q / (time.perf_counter() - t))
    lines = ["| method | questions/s | vs cached |", "| --- | ---: | ---: |"]
    base = statistics.median(times["cached (ours)"])
    for name, ts in times.items():
        m = statistics.median(ts)
        lines.append(f"| {name} | {m:.2f} | {m / base:.2f}× |")
    table = "\n".join(lines) + "\n"
    intro = (
        f"{machine_line()}\n\nRandom-weight OpenELM-{a.preset} fp32, {a.q} questions with a "
        f"{a.context}-token context and 4 choices of {a.choice - 3}-{a.choice} tokens, medians of "
        f"{a.n} rounds (`python benchmarks/bench_choice.py`), BLAS: {blas_line()}; all three "
        "give the same log-likelihoods (rtol 1e-4).\n\n"
    )
    print(table)
    if a.write:
        RESULTS.write_text(
            replace_section(RESULTS.read_text(), "Choice scoring", intro + table + "\n")
        )


if __name__ == "__main__":
    main()
