"""What quantization costs on real text, and how fast quantized folders run on a CPU.

Parts (``--part``), each printing a markdown table and saving its rows to ``--json``:

- ``grid``: the trained checkpoint (``../shared/models/openelm-tiny-shakespeare``) converted with
  round-to-nearest at every bit width (2, 3, 4, 6, 8) × group size (32, 64, 128) and the mixed
  presets: perplexity on held-out ``valid.jsonl`` (the first ``--windows`` windows of
  ``--seq-len`` tokens, documents concatenated with BOS), mean KL to the float32 model and top-1
  agreement on the same tokens, size on disk, bits per weight, decode tok/s.
- ``methods``: RTN and each learned method (``gptq``, ``awq``, ``dwq``, ``dynamic`` at the same
  bits per weight as RTN g64) at 2, 3 and 4 bits, calibrated on ``--samples`` windows of
  ``train.jsonl`` (never the held-out text), side by side, with mlx-lm's own ``gptq_quantize``
  as it ships (``mlx-lm-gptq``, in memory) beside ours.
- ``speed``: decode and perplexity tok/s of 4-bit folders both ways (dequantized to float32 at
  load, the CPU default, vs MLX's quantized kernels), next to float32, for the trained
  checkpoint and the 270M shape (random weights: speed and size only mean something there).
- ``270m``: the 270M shape (random weights) at every bit width, group 64: size and decode tok/s.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        OPENBLAS_CORETYPE=SkylakeX nice python benchmarks/bench_quant.py --part grid
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

import mlx_openelm
from mlx_openelm.convert import convert
from mlx_openelm.convert.quantize import BITS, GROUP_SIZES, MIXED_PRESETS
from mlx_openelm.evaluate import read_texts
from mlx_openelm.loading import load
from mlx_openelm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "openelm-tiny-shakespeare"
TOKENIZER = SHARED / "data" / "llama2-tokenizer" / "tokenizer.model"
VALID = SHARED / "data" / "shakespeare" / "valid.jsonl"
TRAIN = SHARED / "data" / "shakespeare" / "train.jsonl"


def eval_windows(path: Path, tok: Tokenizer, n: int, seq_len: int) -> list[list[int]]:
    ids: list[int] = []
    for text in read_texts(path):
        ids += tok.encode(text)
        if len(ids) >= n * seq_len:
            break
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def log_probs(model: Any, window: list[int]) -> mx.array:
    logits = model(mx.array([window]))[0].astype(mx.float32)  # (L, vocab)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def quality(ref: Any, model: Any, windows: list[list[int]]) -> dict[str, float]:
    """Perplexities, mean KL(ref || model) and top-1 agreement over the windows.

    ``ref``: the float model, run window by window beside ``model`` (holding its log-probs for
    128 windows would take 4 GB).
    """
    nll_p = nll_q = kl = agree = n = 0.0
    for w in windows:
        lp, lq = log_probs(ref, w), log_probs(model, w)
        t = mx.array(w[1:])[:, None]
        nll_p += -mx.take_along_axis(lp[:-1], t, axis=-1).sum().item()
        nll_q += -mx.take_along_axis(lq[:-1], t, axis=-1).sum().item()
        kl += (mx.exp(lp) * (lp - lq)).sum().item()
        agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        n += len(w)
    targets = n - len(windows)
    ppl_ref, ppl = math.exp(nll_p / targets), math.exp(nll_q / targets)
    return {"ppl_ref": ppl_ref, "ppl": ppl, "dppl": ppl / ppl_ref - 1, "kl": kl / n,
            "top1": agree / n}  # fmt: skip


def decode_tps(model: Any, tok: Tokenizer, tokens: int = 32) -> float:
    from mlx_openelm.bench import no_eos

    prompt = tok.encode("KING. What say you, my lord?")
    last = None
    for r in mlx_openelm.stream_generate(model, no_eos(tok), prompt, tokens, temp=0.0):
        last = r
    return last.generation_tps


def ppl_tps(model: Any, windows: list[list[int]]) -> float:
    start = time.perf_counter()
    for w in windows:
        mx.eval(model(mx.array([w])))
    return sum(map(len, windows)) / (time.perf_counter() - start)


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("model*.safetensors")) / 1e6


class Bench:
    def __init__(self, opts: argparse.Namespace, work: Path):
        self.opts, self.work = opts, work
        self.tok = Tokenizer(opts.tokenizer)
        self.windows = eval_windows(opts.valid, self.tok, opts.windows, opts.seq_len)
        self.float_dir = self.convert("float32", dtype="float32")
        self.ref, _ = load(self.float_dir, tokenizer=opts.tokenizer)

    def convert(self, name: str, source: Path | None = None, **kw: Any) -> Path:
        out = self.work / name
        if not out.exists():
            result = convert(source or self.opts.model, out, tokenizer=self.opts.tokenizer,
                             quality=False, **kw)  # fmt: skip
            (out / "bpw.json").write_text(json.dumps(result.bits_per_weight))
        return out

    def row(self, label: str, folder: Path, **extra: Any) -> dict[str, Any]:
        config = json.loads((folder / "config.json").read_text())
        model, _ = load(folder, tokenizer=self.opts.tokenizer)
        out = {"label": label, "mb": folder_mb(folder), **extra,
               **quality(self.ref, model, self.windows), "decode": decode_tps(model, self.tok, 16),
               "method": config.get("converted_by", {}).get("method")}  # fmt: skip
        print(json.dumps(out), flush=True)
        return out

    def mlx_lm_gptq_row(self, bits: int) -> dict[str, Any]:
        """mlx-lm's own ``gptq_quantize`` on our model, as mlx-lm ships it (the tied head rounded
        to nearest, min/max grids), in memory: the peer our ``--method gptq`` is measured against.
        Scales and biases are cast to float16 as a folder stores them."""
        import mlx.nn as nn
        import mlx_lm.quant.gptq as theirs

        from mlx_openelm.convert.calibration import calibration_windows
        from mlx_openelm.convert.learned import (
            _DequantEmbedding,
            _DequantLinear,
            _grids,
            _swap,
            pack_codes,
        )

        model, _ = load(self.float_dir, tokenizer=self.opts.tokenizer)
        data = calibration_windows(self.opts.calibration, self.tok, model.args.vocab_size,
                                   self.opts.samples)  # fmt: skip
        packer, theirs.quantize = theirs.quantize, pack_codes  # theirs packs 2, 4, 8 bits only
        start = time.perf_counter()
        try:
            theirs.gptq_quantize(model, data, bits, 64, bits, 64, batch_size=4)
        finally:
            theirs.quantize = packer
        seconds = time.perf_counter() - start
        _swap(model, {nn.QuantizedLinear: _DequantLinear, nn.QuantizedEmbedding: _DequantEmbedding})
        for m in _grids(model):
            m.scales, m.biases = (
                a.astype(mx.float16).astype(mx.float32) for a in (m.scales, m.biases)
            )
        out = {"label": f"{bits}-bit gptq, mlx-lm as is", "mb": None, "bpw": bits + 0.5,
               **quality(self.ref, model, self.windows), "seconds": seconds,
               "method": "mlx-lm"}  # fmt: skip
        print(json.dumps(out), flush=True)
        return out


def part_grid(b: Bench) -> list[dict[str, Any]]:
    rows = [b.row("float32", b.float_dir, bpw=32.0), b.row("float16", b.convert("f16"), bpw=16.0)]
    for bits in BITS:
        for g in GROUP_SIZES:
            folder = b.convert(f"rtn{bits}g{g}", quantize=True, bits=bits, group_size=g)
            rows.append(b.row(f"{bits}-bit g{g}", folder, bpw=_bpw(folder)))
    for preset in MIXED_PRESETS:
        folder = b.convert(preset, mixed=preset, group_size=64)
        rows.append(b.row(f"{preset} g64", folder, bpw=_bpw(folder)))
    return rows


def part_methods(b: Bench) -> list[dict[str, Any]]:
    rows = []
    learned = {"calibration": b.opts.calibration, "calibration_samples": b.opts.samples}
    for bits in b.opts.bits:
        for method in b.opts.methods:
            kw: dict[str, Any] = {"quantize": True, "bits": bits, "group_size": 64}
            if method == "dynamic":
                kw.update(bits_per_weight=bits + 0.5, **learned)
            if method != "rtn":
                kw.update(method=method, **learned)
            if method == "mlx-lm-gptq":
                rows.append(b.mlx_lm_gptq_row(bits))
                continue
            start = time.perf_counter()
            folder = b.convert(f"{method}{bits}", **kw)
            seconds = time.perf_counter() - start
            rows.append(b.row(f"{bits}-bit {method}", folder, bpw=_bpw(folder), seconds=seconds))
    return rows


def _bpw(folder: Path) -> float | None:
    """Stored bits per quantized weight (scales and biases included), saved at conversion."""
    f = folder / "bpw.json"
    return json.loads(f.read_text()) if f.is_file() else None


def part_speed(b: Bench) -> list[dict[str, Any]]:
    rows = []
    shapes = [("trained 10.5M", None, b.windows[:4])]
    if not b.opts.skip_270m:
        shapes.append(("270M shape", _random_270m(b.work), [w[:32] for w in b.windows[:1]]))
    for shape, source, windows in shapes:
        f32 = b.float_dir if source is None else source
        q4 = b.convert(f"speed4-{shape[:3]}", source=source, quantize=True, bits=4, group_size=64)
        for label, folder, dq in [("float32", f32, None), ("4-bit g64", q4, True),
                                  ("4-bit g64", q4, False)]:  # fmt: skip
            model, _ = load(folder, tokenizer=b.opts.tokenizer, dequantize=dq)
            row = {"shape": shape, "label": label, "runs_as": model.execution.describe(),
                   "decode": decode_tps(model, b.tok, 8), "ppl_tps": ppl_tps(model, windows),
                   "mb": folder_mb(folder)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            del model
    return rows


def _random_270m(work: Path) -> Path:
    from mlx.utils import tree_flatten

    from mlx_openelm.config import ModelArgs
    from mlx_openelm.folder import write_model_folder
    from mlx_openelm.model import Model

    out = work / "src-270M"
    if not out.exists():
        args = ModelArgs.from_preset("270M")
        mx.random.seed(0)
        model = Model(args)
        write_model_folder(out, args.to_dict(), iter(tree_flatten(model.parameters())))
    return out


def part_270m(b: Bench) -> list[dict[str, Any]]:
    src = _random_270m(b.work)
    rows = []
    for bits in BITS:
        folder = b.convert(f"270m-{bits}", source=src, quantize=True, bits=bits, group_size=64)
        model, _ = load(folder, tokenizer=b.opts.tokenizer)
        row = {"label": f"{bits}-bit g64", "mb": folder_mb(folder), "bpw": _bpw(folder),
               "decode": decode_tps(model, b.tok, 16)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _random_3b_slice(work: Path) -> Path:
    """OpenELM-3B's first and last layer shapes (dim 3072, its heads and FFN widths, 32000
    vocab), Gaussian weights at the init scale Apple trains from (std 0.02) with unit norms."""
    from mlx.utils import tree_flatten

    from mlx_openelm.config import ModelArgs
    from mlx_openelm.folder import write_model_folder
    from mlx_openelm.model import Model

    out = work / "src-3B-slice"
    if out.exists():
        return out
    full = ModelArgs.from_preset("3B").to_dict()
    keep = [0, full["num_transformer_layers"] - 1]
    config = {**full, "num_transformer_layers": 2}
    for key in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
        config[key] = [full[key][i] for i in keep]
    args = ModelArgs.from_dict(config)
    model = Model(args)
    mx.random.seed(0)
    weights = [(k, 0.02 * mx.random.normal(v.shape) if v.ndim == 2 else mx.ones(v.shape))
               for k, v in tree_flatten(model.parameters())]  # fmt: skip
    write_model_folder(out, args.to_dict(), iter(weights))
    return out


def part_numerics(b: Bench) -> list[dict[str, Any]]:
    """Every method on 3B-shaped weights: the probe (bfloat16, 3B's default) must stay finite."""
    src, rows = _random_3b_slice(b.work), []
    for method in (m for m in b.opts.methods if m != "mlx-lm-gptq"):
        kw: dict[str, Any] = {"quantize": True, "bits": 4, "group_size": 64, "method": method}
        if method != "rtn":
            kw["calibration_samples"] = 8
        if method == "dynamic":
            kw["bits_per_weight"] = 4.5
        result = convert(src, b.work / f"3b-{method}", tokenizer=b.opts.tokenizer, quality=True,
                         calibration=b.opts.calibration, **kw)  # fmt: skip
        r = result.quality
        row = {"method": method, "dtype": result.dtype, "kl": r.kl_mean, "top1": r.top1_agreement,
               "finite": bool(math.isfinite(r.kl_mean)), "seconds": result.seconds}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def render(part: str, rows: list[dict[str, Any]]) -> str:
    """A markdown table of one part's rows (as saved with --json)."""
    if part == "speed":
        head = "| shape | weights | runs as | MB | decode tok/s | perplexity tok/s |\n"
        head += "| --- | --- | --- | ---: | ---: | ---: |\n"
        return head + "".join(
            f"| {r['shape']} | {r['label']} | {r['runs_as']} | {r['mb']:.1f} | {r['decode']:.3g} "
            f"| {r['ppl_tps']:.3g} |\n"
            for r in rows
        )
    if part == "numerics":
        head = "| method | dtype | finite logits | mean KL | top-1 | convert s |\n"
        head += "| --- | --- | --- | ---: | ---: | ---: |\n"
        return head + "".join(
            f"| {r['method']} | {r['dtype']} | {'yes' if r['finite'] else 'NO'} | {r['kl']:.3f} "
            f"| {r['top1']:.1%} | {r['seconds']:.0f} |\n"
            for r in rows
        )
    if part == "270m":
        head = "| weights | MB | bits/weight | decode tok/s |\n| --- | ---: | ---: | ---: |\n"
        return head + "".join(
            f"| {r['label']} | {r['mb']:.0f} | {r['bpw'] or 0:.2f} | {r['decode']:.1f} |\n"
            for r in rows
        )
    extra = part == "methods"  # decode tok/s stays in the JSON: on a shared CPU it is noise
    head = "| weights | MB | bits/weight | perplexity | vs float32 | mean KL | top-1 |"
    head += " convert s |\n" if extra else "\n"
    head += "| --- |" + " ---: |" * (7 if extra else 6) + "\n"
    return head + "".join(
        f"| {r['label']} | {'—' if r['mb'] is None else format(r['mb'], '.2f')} "
        f"| {r['bpw'] or 32:.2f} | {r['ppl']:.2f} | "
        f"{r['dppl']:+.2%} | {r['kl']:.4f} | {r['top1']:.1%} |"
        + (f" {r['seconds']:.0f} |" if extra else "")
        + "\n"
        for r in rows
    )


PARTS = {"grid": part_grid, "methods": part_methods, "speed": part_speed, "270m": part_270m,
         "numerics": part_numerics}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=PARTS, required=True)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    p.add_argument("--valid", type=Path, default=VALID)
    p.add_argument("--calibration", type=Path, default=TRAIN)
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--methods", nargs="+",
                   default=["rtn", "mlx-lm-gptq", "gptq", "awq", "dwq", "dynamic"])  # fmt: skip
    p.add_argument("--skip-270m", action="store_true")
    p.add_argument("--work", type=Path, default=None, help="Keep converted folders here.")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--render", type=Path, default=None, help="Print a saved --json as markdown.")
    opts = p.parse_args()
    if opts.render:
        return print(render(opts.part, json.loads(opts.render.read_text())))
    with tempfile.TemporaryDirectory() as tmp:
        work = opts.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"# {platform.machine()}, mlx {mx.__version__}, {mx.default_device()}", flush=True)
        rows = PARTS[opts.part](Bench(opts, work))
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1))
    print(render(opts.part, rows))


if __name__ == "__main__":
    main()
