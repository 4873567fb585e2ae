"""Running an exported GGUF in llama.cpp itself (through ``llama-cpp-python``), for checks and
side-by-side timing.

Used by the parity tests, ``benchmarks/bench_gguf.py`` and ``bench --compare-llama-cpp``.
Logits come from llama.cpp's own graph (``logits_all``), greedy decoding picks the arg-max of
those logits (as ours does at temperature 0), and timing uses llama.cpp's own counters
(``llama_perf_context``: prompt and decode milliseconds), just as our side uses mlx-lm's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDependencyError


def require_llama_cpp() -> Any:
    """The ``llama_cpp`` module.

    Raises:
        MissingDependencyError: llama-cpp-python is not installed.
    """
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError(
            "comparing with llama.cpp needs llama-cpp-python: pip install llama-cpp-python "
            "(it builds llama.cpp from source; cmake and a C++ compiler are required)"
        ) from None
    return llama_cpp


def open_llama(
    path: str | Path,
    n_ctx: int = 512,
    logits_all: bool = True,
    threads: int | None = None,
    **kw: Any,
) -> Any:
    """A quiet ``llama_cpp.Llama`` on ``path``.

    ``threads`` None keeps llama-cpp-python's defaults (decode on half the cores, as if each had
    two hyper-threads; prompt batches on all), which is what a user of the package gets. On a
    shared, oversubscribed machine one thread is far faster for checks: llama.cpp's threads spin
    at every barrier and stall when the OS parks one of them.
    """
    llama_cpp = require_llama_cpp()
    if threads is not None:
        kw = {"n_threads": threads, "n_threads_batch": threads, **kw}
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
        logits_all=logits_all, verbose=False, **kw,
    )  # fmt: skip


def llama_logits(llm: Any, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits (L, vocab) for ``tokens`` from an empty context."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_greedy(llm: Any, prompt: list[int], n: int) -> list[int]:
    """``n`` tokens llama.cpp generates greedily after ``prompt`` (EOS not special)."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def mlx_logits(model: Any, tokens: list[int]) -> np.ndarray:
    """Our model's float32 logits (L, vocab), the other side of every comparison here."""
    import mlx.core as mx

    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def mlx_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """``n`` tokens our model generates greedily after ``prompt`` (with its KV cache)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    out: list[int] = []
    for _ in range(n):
        out.append(int(mx.argmax(logits).item()))
        logits = model(mx.array([out[-1:]]), cache=cache)[0, -1]
    return out


def max_rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max |want|``: the logit error figure of the parity checks."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def _last_logits(llm: Any) -> np.ndarray:
    llama_cpp = require_llama_cpp()
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> None:
    try:  # Linux: writing 5 resets VmHWM (the peak resident set) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def time_llama(llm: Any, prompt: list[int], n: int, baseline_rss: int | None) -> dict[str, Any]:
    """One timed run: prompt and decode tokens/s by llama.cpp's own counters, peak RSS growth.

    Args:
        baseline_rss: the process's RSS before the GGUF was loaded; the peak memory reported is
            the peak RSS above it (weights mapped in, KV cache, compute buffers). None: not
            measured.
    """
    llama_cpp = require_llama_cpp()
    llm.reset()
    _reset_peak_rss()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    llm.eval(prompt)
    for _ in range(n):
        llm.eval([int(np.argmax(_last_logits(llm)))])
    perf = llama_cpp.llama_perf_context(llm.ctx)
    peak = rss_bytes("VmHWM")
    return {
        "prompt_tps": perf.n_p_eval / (perf.t_p_eval_ms / 1e3),
        "generation_tps": perf.n_eval / (perf.t_eval_ms / 1e3),
        "peak_memory_gb": (peak - baseline_rss) / 1e9 if peak and baseline_rss else float("nan"),
        "generated": n,
    }


def export_for_llama_cpp(folder: Path, bits: int | None, dtype_f32: bool) -> tuple[Path, str]:
    """Write ``folder`` to a temporary GGUF in the type that matches it for a fair race.

    float32 -> F32, 16-bit floats -> F16, 8-bit -> Q8_0, 4-bit -> Q4_0 (other widths -> F16).

    Returns:
        ``(path, label)``; the caller deletes the file.
    """
    from gguf import GGMLQuantizationType as Q

    from ..hub import resolve_tokenizer_file
    from ..loading import load_model
    from ..tokenizer import Tokenizer
    from .model import prepare_model, write_model_gguf

    qtype = {8: Q.Q8_0, 4: Q.Q4_0}.get(bits, Q.F32 if dtype_f32 and bits is None else Q.F16)
    net, config = load_model(folder, lazy=True)
    net, _ = prepare_model(net, bool(config.get("quantization")), None)
    tok_file = resolve_tokenizer_file(model_dir=folder)
    template = Tokenizer.from_folder(folder, tok_file).chat_template
    fd, tmp = tempfile.mkstemp(suffix=f"-{qtype.name}.gguf", dir=tempfile.gettempdir())
    os.close(fd)
    write_model_gguf(net, Path(tmp), qtype, tok_file, template, folder.name, force=True)
    return Path(tmp), f"llama.cpp {qtype.name}"
