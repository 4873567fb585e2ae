"""How fast is a model: prompt and generation throughput, peak memory, and the decode limit.

``bench(model)`` feeds a random-token prompt and generates a fixed number of tokens (EOS is
ignored, as in ``mlx_lm.benchmark``), several times, through our generation loop
(:func:`mlx_openelm.generate.stream_generate`). With ``compare_mlx_lm`` the same folder is also
loaded by mlx-lm's own OpenELM implementation and driven by ``mlx_lm.stream_generate`` in the
same process; the two alternate trial by trial, so background load hits both alike. Both sides use
the same tokenizer and mlx-lm's timing (``prompt_tps``, ``generation_tps``), so only the model
implementation differs.

With ``compare_llama_cpp`` the folder is also exported to a GGUF of the matching type (F32 for
float32, Q8_0/Q4_0 for 8-/4-bit) and timed in llama.cpp (``llama-cpp-python``), alternating with
the other rows, by llama.cpp's own counters (:mod:`mlx_openelm.export.llama_cpp`).

Decoding one token reads every weight once (the tied embedding doubles as the output layer)
plus the KV cache, so ``memory bandwidth / bytes per token`` bounds the generation speed. The
bandwidth is the machine's, measured outside MLX (:mod:`mlx_openelm.bandwidth`: NumPy, one
reader process per core), so the limit is the same for every runtime.
:func:`measure_bandwidth` reports, for comparison, the read rate MLX itself reaches.
"""

from __future__ import annotations

import functools
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .bandwidth import measure_read_bandwidth
from .errors import GenerationError

OUR_ROW = "mlx-openelm"
MLX_LM_ROW = "mlx-lm"
LLAMA_CPP_ROW = "llama.cpp"  # + the GGUF type: "llama.cpp F32"


@dataclass(frozen=True, kw_only=True)
class Trial:
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float  # this model's weights + the trial's working memory
    generated: int  # tokens generated (always the requested number: EOS is ignored)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass(kw_only=True)
class BenchRow:
    name: str
    trials: list[Trial] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Mean and sample standard deviation of each measurement over the trials."""
        out: dict[str, Any] = {"name": self.name, "trials": len(self.trials)}
        for key in ("prompt_tps", "generation_tps", "peak_memory_gb"):
            mean, std = _mean_std([getattr(t, key) for t in self.trials])
            out[key], out[key + "_std"] = mean, std
        return out


@dataclass(kw_only=True)
class BenchReport:
    model: str
    prompt_tokens: int
    generation_tokens: int
    weight_bytes: int
    bytes_per_token: int  # weights + KV cache at the mean decode position
    bandwidth_gbs: float | None  # measured; None when not measured
    rows: list[BenchRow]
    bandwidth_method: str | None = None  # how bandwidth_gbs was measured (the limit's label)

    @property
    def decode_limit_tps(self) -> float | None:
        """Tokens/s if decoding only had to stream its bytes at the measured bandwidth."""
        if self.bandwidth_gbs is None:
            return None
        return self.bandwidth_gbs * 1e9 / self.bytes_per_token

    def ratio(self, other: str = MLX_LM_ROW) -> dict[str, float] | None:
        """ours / ``other`` row for the mean prompt and generation speed (> 1: we are faster)."""
        rows = {r.name: r.summary() for r in self.rows}
        if OUR_ROW not in rows or other not in rows:
            return None
        ours, theirs = rows[OUR_ROW], rows[other]
        return {k: ours[k] / theirs[k] for k in ("prompt_tps", "generation_tps")}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "weight_bytes": self.weight_bytes,
            "bytes_per_token": self.bytes_per_token,
            "bandwidth_gbs": self.bandwidth_gbs,
            "bandwidth_method": self.bandwidth_method,
            "decode_limit_tps": self.decode_limit_tps,
            "rows": [r.summary() for r in self.rows],
            "ratio": self.ratio(),
            "ratio_llama_cpp": next(
                (self.ratio(r.name) for r in self.rows if r.name.startswith(LLAMA_CPP_ROW)), None
            ),
        }


def _best_gbs(nbytes: int, run: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(run())
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def measure_bandwidth(megabytes: int = 256, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth MLX reaches here, in GB/s (best of ``repeats`` each).

    ``sum``: one reduction over a ``megabytes`` float32 array; ``parallel_sum`` (CPU only):
    one reduction per core, each on its own CPU stream (MLX runs each CPU op on one thread);
    ``gemv``: a float32 matrix times a vector, which reads the matrix once (multi-threaded with
    a good BLAS); ``copy``: ``x * 1`` (read + write). Decoding reads its weights, so ``read`` =
    the best of the three reads is the bound used for the decode limit.
    """
    x = mx.random.uniform(shape=(megabytes * (1 << 20) // 4,))
    side = int((megabytes * (1 << 20) // 4) ** 0.5)
    w, v = mx.random.uniform(shape=(side, side)), mx.random.uniform(shape=(side,))
    mx.eval(x, w, v)
    out = {
        "sum": _best_gbs(x.nbytes, lambda: x.sum(), repeats),
        "gemv": _best_gbs(w.nbytes, lambda: w @ v, repeats),
        "copy": _best_gbs(2 * x.nbytes, lambda: x * 1.0, repeats),
    }
    cores = os.cpu_count() or 1
    if mx.default_device() == mx.cpu and cores > 1:
        parts, streams = mx.split(x, cores), [mx.new_stream(mx.cpu) for _ in range(cores)]
        out["parallel_sum"] = _best_gbs(
            x.nbytes, lambda: [p.sum(stream=s) for p, s in zip(parts, streams)], repeats
        )
    out["read"] = max(out["sum"], out["gemv"], out.get("parallel_sum", 0.0))
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (quantized weights with their scales and biases)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def kv_bytes(model: nn.Module, tokens: int) -> int:
    """Bytes of keys and values for ``tokens`` positions at the model's activation dtype."""
    args = model.args
    itemsize = model.transformer.norm.weight.dtype.size
    return 2 * tokens * args.head_dim * itemsize * sum(args.num_kv_heads)


def random_prompt(vocab_size: int, tokens: int, seed: int = 0) -> list[int]:
    """``tokens`` uniformly random token ids (a reproducible prompt that needs no text)."""
    return mx.random.randint(0, vocab_size, (tokens,), key=mx.random.key(seed)).tolist()


def _check(prompt_tokens: int, generation_tokens: int, trials: int) -> None:
    for name, value in (
        ("prompt tokens (-p)", prompt_tokens),
        ("generation tokens (-g)", generation_tokens),
        ("trials (-n)", trials),
    ):
        if value < 1:
            raise GenerationError(f"{name} must be at least 1, got {value}")


def no_eos(tokenizer: Any) -> Any:
    """An mlx-lm tokenizer wrapper that never stops on EOS (fixed-length runs)."""
    wrapper = tokenizer.to_mlx_lm() if hasattr(tokenizer, "to_mlx_lm") else tokenizer
    wrapper.eos_token_ids = []
    return wrapper


def run_trial(
    generate: Callable[..., Any],
    model: nn.Module,
    own_bytes: int,
    on_response: Callable[[Any], None] | None = None,
    **kw: Any,
) -> Trial:
    """One timed run of ``generate(model, **kw)`` (our or mlx-lm's ``stream_generate``).

    Peak memory counts this model's weights (``own_bytes``), not every loaded model's;
    ``on_response`` sees each response (e.g. to collect the tokens).
    """
    gc.collect()
    mx.clear_cache()
    baseline = mx.get_active_memory()
    mx.reset_peak_memory()
    last = None
    for response in generate(model, **kw):
        last = response
        if on_response is not None:
            on_response(response)
    peak = mx.get_peak_memory() - baseline + own_bytes
    return Trial(
        prompt_tps=last.prompt_tps,
        generation_tps=last.generation_tps,
        peak_memory_gb=peak / 1e9,
        generated=last.generation_tokens,
    )


def bench(
    model: str | Path,
    prompt_tokens: int = 512,
    generation_tokens: int = 128,
    trials: int = 3,
    compare_mlx_lm: bool = False,
    seed: int = 0,
    measure_limit: bool = True,
    on_trial: Callable[[str, int, Trial], None] | None = None,
    compare_llama_cpp: bool = False,
) -> BenchReport:
    """Benchmark a model folder (or hub id): our loop, optionally next to mlx-lm and llama.cpp.

    Args:
        model: model folder or hub repo id.
        prompt_tokens, generation_tokens: per trial; the prompt is random token ids.
        trials: timed runs per row, after one short untimed warm-up run each.
        compare_mlx_lm: also run mlx-lm's implementation on the same folder.
        seed: for the random prompt.
        measure_limit: measure memory bandwidth for the decode limit (takes a few seconds).
        on_trial: called with ``(row_name, trial_index, Trial)`` after each timed run.
        compare_llama_cpp: also export the folder to GGUF and time it in llama.cpp.

    Raises:
        GenerationError: a count below 1, or a prompt longer than the context.
        MissingDependencyError: no llama-cpp-python (when asked). Loading errors as in
            :func:`mlx_openelm.load`.
    """
    from .generate import check_prompt_length, stream_generate
    from .loading import load, resolve_model_path

    _check(prompt_tokens, generation_tokens, trials)
    folder = resolve_model_path(model)
    if compare_llama_cpp:
        from .export.llama_cpp import require_llama_cpp

        require_llama_cpp()  # before anything slow
    ours, tokenizer = load(folder)
    check_prompt_length(ours, prompt_tokens, generation_tokens)
    models = [(OUR_ROW, stream_generate, ours)]
    if compare_mlx_lm:
        from mlx_lm import stream_generate as mlx_lm_stream_generate
        from mlx_lm.utils import load_model as mlx_lm_load_model

        theirs, _ = mlx_lm_load_model(folder)
        models.append((MLX_LM_ROW, mlx_lm_stream_generate, theirs))
    prompt = random_prompt(ours.args.vocab_size, prompt_tokens, seed)
    kw = {"tokenizer": no_eos(tokenizer), "prompt": prompt, "max_tokens": generation_tokens}
    # Warm-up (untimed, short: any forward touches every weight once and builds the kernels).
    warm = {**kw, "prompt": prompt[:16], "max_tokens": min(generation_tokens, 4)}
    runners: list[tuple[str, Callable[[], Trial]]] = []
    for name, generate, m in models:
        run_trial(generate, m, 0, **warm)
        runners.append((name, functools.partial(run_trial, generate, m, weight_bytes(m), **kw)))
    if compare_llama_cpp:
        runners.append(_llama_cpp_runner(folder, ours, prompt, generation_tokens))
    rows = _run_rows(runners, trials, on_trial)
    wbytes = weight_bytes(ours)
    limit = measure_read_bandwidth() if measure_limit else None
    return BenchReport(
        model=str(folder),
        prompt_tokens=prompt_tokens,
        generation_tokens=generation_tokens,
        weight_bytes=wbytes,
        bytes_per_token=wbytes + kv_bytes(ours, prompt_tokens + generation_tokens // 2),
        bandwidth_gbs=limit.gbs if limit else None,
        rows=rows,
        bandwidth_method=limit.method if limit else None,
    )


def _run_rows(
    runners: list[tuple[str, Callable[[], Trial]]],
    trials: int,
    on_trial: Callable[[str, int, Trial], None] | None,
) -> list[BenchRow]:
    """Alternate the runners trial by trial (reversed every other trial), so load hits all."""
    rows = [BenchRow(name=name) for name, _ in runners]
    for i in range(trials):
        order = range(len(runners)) if i % 2 == 0 else reversed(range(len(runners)))
        for j in order:
            name, run = runners[j]
            trial = run()
            rows[j].trials.append(trial)
            if on_trial is not None:
                on_trial(name, i, trial)
    return rows


def _llama_cpp_runner(
    folder: Path, ours: nn.Module, prompt: list[int], generation_tokens: int
) -> tuple[str, Callable[[], Trial]]:
    """Export ``folder`` to a matching GGUF, load it in llama.cpp, warm it up; a trial runner."""
    from .export.llama_cpp import export_for_llama_cpp, open_llama, rss_bytes, time_llama

    quant = ours.args.quantization or {}
    f32 = ours.transformer.norm.weight.dtype == mx.float32
    path, label = export_for_llama_cpp(folder, quant.get("bits"), f32)
    baseline = rss_bytes("VmRSS")
    llm = open_llama(path, n_ctx=len(prompt) + generation_tokens + 8, logits_all=False)
    os.unlink(path)  # mapped already; the file goes when llama.cpp lets go of it
    time_llama(llm, prompt[:16], min(generation_tokens, 4), None)  # warm-up

    def run() -> Trial:
        r = time_llama(llm, prompt, generation_tokens, baseline)
        return Trial(**r)

    return label, run


def _pm(mean: float, std: float, digits: int = 1) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_bench(report: BenchReport) -> str:
    """A plain-text table of a :class:`BenchReport` (rows, ratio, decode limit)."""
    head = (
        f"{report.model}: {report.weight_bytes / 1e6:.1f} MB of weights, "
        f"{report.prompt_tokens}-token random prompt, {report.generation_tokens} generated"
    )
    lines = [head, f"{'':<16}{'prompt tok/s':>18}{'generation tok/s':>20}{'peak memory GB':>20}"]
    for row in report.rows:
        s = row.summary()
        lines.append(
            f"{row.name:<16}{_pm(s['prompt_tps'], s['prompt_tps_std']):>18}"
            f"{_pm(s['generation_tps'], s['generation_tps_std']):>20}"
            f"{_pm(s['peak_memory_gb'], s['peak_memory_gb_std'], 3):>20}"
        )
    for row in report.rows[1:]:
        ratio = report.ratio(row.name)
        label = f"ours / {row.name.split()[0]}"
        lines.append(f"{label:<16}{ratio['prompt_tps']:>17.2f}x{ratio['generation_tps']:>19.2f}x")
    if report.decode_limit_tps is not None:
        lines.append(
            f"{'decode limit':<16}{'':>18}{report.decode_limit_tps:>20.1f}"
            f"   = {report.bandwidth_gbs:.1f} GB/s read bandwidth"
            f" / {report.bytes_per_token / 1e6:.1f} MB per token (weights + KV cache)"
        )
        lines.append(f"{'':<16}bandwidth: {report.bandwidth_method}")
    lines.append(f"(mean ± std over {len(report.rows[0].trials)} trials)")
    return "\n".join(lines)
