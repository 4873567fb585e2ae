"""Serving speed, ours vs ``mlx_lm.server``, with 1, 4 and 8 concurrent streaming clients.

Both servers run as subprocesses on loopback, serving the same 270M-shaped random-weights folder
(written by our folder writer, as ``bench_generate.py`` does; a base model, so neither applies a
chat template or Instruct defaults): ``mlx-openelm serve --max-batch 8`` and
``python -m mlx_lm.server`` (which batches too, on the same ``BatchGenerator``). Each round
sends every client its own prompt at once (a barrier starts them) as a streaming
``/v1/completions`` request, greedy, EOS biased away so every reply is ``--tokens`` long.
Rounds alternate between the servers (ours, mlx-lm, mlx-lm, ours, ...) so background load hits
both alike; medians are reported.

Per round: total generated tokens / wall time (tok/s), the median client's time to first token,
its per-token latency after the first ((last - first) / (n - 1)) and the server's peak resident
memory during the round (``VmHWM``, reset before each round through ``/proc/PID/clear_refs``).
It also checks that each batched reply equals the reply the same prompt gets alone.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 OPENBLAS_CORETYPE=SkylakeX \\
        python benchmarks/bench_server.py --write     # replace "## Server" in RESULTS.md

``--json`` and ``--lookup N`` run our server alone, plain requests against the same requests with
``response_format`` json_schema or ``prompt_lookup_num_tokens: N``.

Bounded: ``--budget`` seconds in all (rounds that would start past it are skipped and said so).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_openelm.config import ModelArgs
from mlx_openelm.folder import write_model_folder
from mlx_openelm.model import Model
from mlx_openelm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"
SECTION = "## Server"
JSON_SECTION = "## Server: structured output"
LOOKUP_SECTION = "## Server: prompt lookup"
EOS = 2  # Llama-2's
WORDS = "the a river mountain quiet city light morning story old friend walked over".split()


def make_folder(path: Path) -> Path:
    """The 270M preset, MLX's default random init, float32, as a base model."""
    args = ModelArgs.from_preset("270M")
    mx.random.seed(0)
    model = Model(args)
    write_model_folder(
        path, args.to_dict(), tree_flatten(model.parameters()), tokenizer=Tokenizer(TOKENIZER)
    )
    return path


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free loopback port; ``peak_mb()`` since the last ``reset()``."""

    def __init__(self, name: str, cmd: list[str]) -> None:
        self.name, self.port = name, free_port()
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        sys.exit(f"{self.name} did not start within {timeout:.0f} s")

    def reset(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # resets VmHWM

    def peak_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --json: every request of the "ours json" runner asks for this (one long free string, so a
# random model's reply runs to max_tokens like the plain one; EOS is still biased away, and the
# grammar allows only EOS once the object is closed).
JSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "note",
        "schema": {
            "type": "object",
            "properties": {"title": {"type": "string"}, "mood": {"enum": ["calm", "grim"]},
                           "text": {"type": "string"}},
            "required": ["title", "mood", "text"],
        },
    },
}  # fmt: skip


def stream_one(
    port: int, prompt: str, tokens: int, start: threading.Barrier, extra: dict | None = None
) -> dict:
    """One streaming completion: its text, token count, TTFT and per-token latency."""
    body = {
        "model": "default_model", "prompt": prompt, "max_tokens": tokens, "temperature": 0.0,
        "stream": True, "logit_bias": {str(EOS): -100}, "stream_options": {"include_usage": True},
        **(extra or {}),
    }  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start.wait()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    text, times, usage = [], [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            text.append(chunk["choices"][0]["text"])
            times.append(time.perf_counter())
    conn.close()
    n = (usage or {}).get("completion_tokens") or len(times)
    per_token = (times[-1] - times[0]) / max(len(times) - 1, 1) if times else float("nan")
    return {"text": "".join(text), "n": n, "ttft": times[0] - t0, "per_token": per_token}


def one_round(server: Server, prompts: list[str], tokens: int, extra: dict | None = None) -> dict:
    start = threading.Barrier(len(prompts) + 1)
    results: list[dict | None] = [None] * len(prompts)

    def client(i: int) -> None:
        results[i] = stream_one(server.port, prompts[i], tokens, start, extra)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    server.reset()
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    if len(done) < len(prompts):
        sys.exit(f"{server.name}: {len(prompts) - len(done)} of {len(prompts)} clients failed")
    return {
        "tps": sum(r["n"] for r in done) / wall,
        "ttft": statistics.median(r["ttft"] for r in done),
        "per_token": statistics.median(r["per_token"] for r in done),
        "peak_mb": server.peak_mb(),
        "texts": [r["text"] for r in done],
    }


def table(rows: dict[tuple[str, int], list[dict]], clients: list[int]) -> str:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("tps", "ttft", "per_token",
                                                              "peak_mb")}
           for k, v in rows.items() if v}  # fmt: skip
    lines = [
        "| clients | server | total tok/s | TTFT s | per-token s | peak RSS MB | "
        "tok/s vs mlx-lm | tok/s vs ours at 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in clients:
        for name in ("ours", "mlx-lm"):
            m = med.get((name, c))
            if m is None:
                lines.append(f"| {c} | {name} | not run (budget) | | | | | |")
                continue
            theirs, base = med.get(("mlx-lm", c)), med.get(("ours", 1))
            vs = f"{m['tps'] / theirs['tps']:.2f}×" if theirs else "-"
            vs1 = f"{m['tps'] / base['tps']:.2f}×" if base and name == "ours" else "-"
            lines.append(
                f"| {c} | {name} | {m['tps']:.1f} | {m['ttft']:.2f} | {m['per_token']:.3f} "
                f"| {m['peak_mb']:.0f} | {vs} | {vs1} |"
            )
    return "\n".join(lines)


def write_section(text: str, section: str = SECTION) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section + "\n" in old:
        start = old.index(section + "\n")
        nxt = old.find("\n## ", start + len(section))
        old = old[:start].rstrip("\n") + ("\n\n" + old[nxt + 1 :] if nxt >= 0 else "\n")
    RESULTS.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def alternate(
    rows: dict[tuple[str, int], list[dict]],
    names: tuple[str, str],
    args: argparse.Namespace,
    clients: list[int],
    began: float,
    run: Callable[[str, int], dict],
) -> None:
    """``args.rounds`` rounds at each client count, the two runners' order alternating (so
    background load hits both alike); rounds that would start past ``args.budget`` are skipped."""
    for r in range(args.rounds):
        for c in clients:
            for name in names if (r + c) % 2 == 0 else names[::-1]:
                if time.monotonic() - began > args.budget:
                    continue
                rows[(name, c)].append(run(name, c))
                print(f"{name} x{c} round {r}: {rows[(name, c)][-1]['tps']:.1f} tok/s",
                      file=sys.stderr)  # fmt: skip


def ours_server(folder: str, max_batch: int) -> Server:
    cmd = [sys.executable, "-m", "mlx_openelm.cli", "serve", "-m", folder,
           "--max-batch", str(max_batch)]  # fmt: skip
    return Server("ours", cmd)


def ours_rounds(
    runners: dict[str, dict | None], args: argparse.Namespace, prompts: list[str],
    clients: list[int], began: float,
) -> dict[tuple[str, int], list[dict]]:  # fmt: skip
    """Our server alone, the same rounds for two kinds of request (``runners``: name -> extra
    request fields), alternating."""
    rows: dict[tuple[str, int], list[dict]] = {(n, c): [] for c in clients for n in runners}
    with tempfile.TemporaryDirectory() as tmp:
        server = ours_server(str(make_folder(Path(tmp) / "openelm-270M-random")), max(clients))
        try:
            server.wait_ready()
            for extra in runners.values():  # warm-up (a grammar's vocabulary is built once)
                one_round(server, prompts[:2], 4, extra)
            alternate(
                rows, tuple(runners), args, clients, began,
                lambda name, c: one_round(server, prompts[:c], args.tokens, runners[name]),
            )  # fmt: skip
        finally:
            server.stop()
    return rows


def pair_lines(
    rows: dict[tuple[str, int], list[dict]], clients: list[int], names: tuple[str, str],
    last: tuple[str, Callable[[list[dict], list[dict]], str]],
) -> list[str]:  # fmt: skip
    """A table, a row per client count: both runners' median tok/s, their ratio, median TTFTs
    and a last column (``last``: its header, and its cell from the two runners' rounds)."""
    x, y = names
    lines = [f"| clients | {x} tok/s | {y} tok/s | {y} / {x} | TTFT s {x} / {y} | {last[0]} |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for c in clients:
        a, b = rows[(names[0], c)], rows[(names[1], c)]
        if not a or not b:
            lines.append(f"| {c} | not run (budget) | | | | |")
            continue
        p, q = (statistics.median(r["tps"] for r in x) for x in (a, b))
        tp, tq = (statistics.median(r["ttft"] for r in x) for x in (a, b))
        lines.append(f"| {c} | {p:.1f} | {q:.1f} | {q / p:.2f}× | {tp:.2f} / {tq:.2f} "
                     f"| {last[1](a, b)} |")  # fmt: skip
    return lines


def run_lookup(args: argparse.Namespace, prompts: list[str], clients: list[int], began: float,
               load: tuple[float, ...]) -> None:  # fmt: skip
    """Our server alone: plain requests vs the same with ``prompt_lookup_num_tokens``."""
    runners = {"plain": None, "lookup": {"prompt_lookup_num_tokens": args.lookup}}
    rows = ours_rounds(runners, args, prompts, clients, began)

    def same(plain: list[dict], look: list[dict]) -> str:
        return "yes" if all(r["texts"] == plain[0]["texts"] for r in plain + look) else "NO"

    lines = pair_lines(rows, clients, ("plain", "lookup"), ("same replies", same))
    text = (
        f"{LOOKUP_SECTION}\n\n"
        f"`python benchmarks/bench_server.py --lookup {args.lookup}` — our server alone "
        f"(`--max-batch {max(clients)}`), the 270M-shaped random float32 model, {args.tokens} "
        f"tokens per client, greedy, EOS biased away, streaming `/v1/completions`; rounds "
        f"alternate between plain requests and the same requests with "
        f"`prompt_lookup_num_tokens: {args.lookup}`, {args.rounds} rounds (median), "
        f"{os.cpu_count()} CPU cores, load average {load[0]:.2f} at start. One client finds the "
        f"server idle and decodes with lookup alone; clients arriving together share the batch "
        f"and decode plainly. Took {time.monotonic() - began:.0f} s.\n\n"
        + "\n".join(lines) + "\n"
    )  # fmt: skip
    print(text)
    if args.write:
        write_section(text, LOOKUP_SECTION)


def run_json(args: argparse.Namespace, prompts: list[str], clients: list[int], began: float,
             load: tuple[float, ...]) -> None:  # fmt: skip
    """Our server alone: the same rounds, plain requests vs ``response_format`` json_schema."""
    runners = {"plain": None, "json": {"response_format": JSON_FORMAT}}
    rows = ours_rounds(runners, args, prompts, clients, began)

    def parsed(_: list[dict], js: list[dict]) -> str:
        texts = [t for r in js for t in r["texts"]]
        return f"{sum(_json_or_prefix(t) for t in texts)}/{len(texts)}"

    last = ("json replies that parse (or are a cut-off prefix)", parsed)
    lines = pair_lines(rows, clients, ("plain", "json"), last)
    text = (
        f"{JSON_SECTION}\n\n"
        f"`python benchmarks/bench_server.py --json` — our server alone (`--max-batch "
        f"{max(clients)}`), the 270M-shaped random float32 model, {args.tokens} tokens per "
        f"client, greedy, EOS biased away, streaming `/v1/completions`; rounds alternate between "
        f"plain requests and the same requests with `response_format` json_schema (an object of "
        f"two strings and an enum), {args.rounds} rounds (median), {os.cpu_count()} CPU cores, "
        f"load average {load[0]:.2f} at start. Took {time.monotonic() - began:.0f} s.\n\n"
        + "\n".join(lines) + "\n"
    )  # fmt: skip
    print(text)
    if args.write:
        write_section(text, JSON_SECTION)


def _json_or_prefix(text: str) -> bool:
    """The reply parses as JSON, or (cut at max_tokens) is a prefix that closing it would make
    parse: the string or object is completed by appending quote/brace characters."""
    for tail in ("", '"}', "}", '"', '"]}', "]}"):
        try:
            json.loads(text + tail)
            return True
        except ValueError:
            continue
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--tokens", type=int, default=32, help="generated per client")
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget", type=float, default=900, help="seconds in all")
    parser.add_argument("--write", action="store_true", help=f"replace {SECTION} in RESULTS.md")
    parser.add_argument(
        "--json", action="store_true",
        help=f"ours only, plain vs response_format json_schema requests ({JSON_SECTION})",
    )  # fmt: skip
    parser.add_argument(
        "--lookup", type=int, metavar="N",
        help=f"ours only, plain vs prompt_lookup_num_tokens N requests ({LOOKUP_SECTION})",
    )  # fmt: skip
    args = parser.parse_args()
    if not TOKENIZER.is_file():
        sys.exit(f"needs the Llama-2 tokenizer at {TOKENIZER} (../shared)")
    clients = [int(c) for c in args.clients.split(",")]
    began = time.monotonic()
    prompts = [
        " ".join(WORDS[(i * 7 + j * (i + 3)) % len(WORDS)] for j in range(args.prompt_words))
        for i in range(max(clients))
    ]
    rows: dict[tuple[str, int], list[dict]] = {
        (n, c): [] for c in clients for n in ("ours", "mlx-lm")
    }
    load = os.getloadavg()
    if args.json:
        return run_json(args, prompts, clients, began, load)
    if args.lookup:
        return run_lookup(args, prompts, clients, began, load)
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(make_folder(Path(tmp) / "openelm-270M-random"))
        servers = {
            "ours": ours_server(folder, max(clients)),
            "mlx-lm": Server("mlx-lm", [sys.executable, "-m", "mlx_lm.server", "--model", folder]),
        }
        try:
            for s in servers.values():
                s.wait_ready()
            for s in servers.values():  # warm-up: first calls compile and allocate
                one_round(s, prompts[:2], 4)
            alternate(
                rows, ("ours", "mlx-lm"), args, clients, began,
                lambda name, c: one_round(servers[name], prompts[:c], args.tokens),
            )  # fmt: skip
        finally:
            for s in servers.values():
                s.stop()
    alone = {i: t for i, t in enumerate(rows[("ours", 1)][0]["texts"])} if rows[("ours", 1)] else {}
    same_batch = all(
        r["texts"][0] == alone.get(0) for c in clients for r in rows[("ours", c)]
    )  # client 0 has the same prompt in every round
    same_mlx = all(r["texts"] == rows[("ours", c)][0]["texts"][: len(r["texts"])]
                   for c in clients for r in rows[("mlx-lm", c)] if rows[("ours", c)])  # fmt: skip
    text = (
        f"{SECTION}\n\n"
        f"`python benchmarks/bench_server.py` — 270M-shaped random float32 model, "
        f"{args.prompt_words}-word prompts (one per client), {args.tokens} tokens generated "
        f"greedily per client (EOS biased away), streaming `/v1/completions` over loopback, "
        f"{args.rounds} alternating rounds (median), {os.cpu_count()} CPU cores, load average "
        f"{load[0]:.2f} at start, BLAS: `{os.environ.get('LD_PRELOAD') or 'as installed'}`, "
        f"mlx {mx.__version__}. Ours: `mlx-openelm serve --max-batch {max(clients)}`; mlx-lm: "
        f"`python -m mlx_lm.server` (its defaults: decode concurrency 32). Client 0's reply is "
        f"the same at every concurrency: {'yes' if same_batch else 'NO'}; mlx-lm's replies "
        f"equal ours: {'yes' if same_mlx else 'NO'}. Took {time.monotonic() - began:.0f} s.\n\n"
        f"{table(rows, clients)}\n"
    )
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
