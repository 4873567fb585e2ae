"""Prompt-lookup decoding vs mlx-lm's plain generation, side by side, on three kinds of prompt.

Models: the trained ``../shared/models/openelm-tiny-shakespeare`` (converted to an fp32 MLX
folder by our converter) and the 270M shape with MLX's random init (fp32). Prompts are real text
from ``../shared/data/shakespeare/valid.jsonl`` (Othello, never trained on), of three kinds:

- ``continue``: a passage, to be continued;
- ``quote``: the passage, a blank line and its first line again (the model goes on quoting: the
  case prompt lookup is made for);
- ``question``: the passage and a question about it.

Runners, all greedy with EOS ignored (every run generates the same number of tokens): ``mlx-lm``
(``mlx_lm.load`` + ``mlx_lm.stream_generate``, plain), ``ours plain``
(``mlx_openelm.stream_generate``), ``ours lookup N`` for N = 3, 5, 10 (our defaults: n-grams of
4 tokens down to 1) and ``ours lookup 10, n-gram <= 2`` (Hugging Face's longest n-gram, 2, for
comparison). Each must produce mlx-lm's tokens exactly. Runs alternate their order round by
round after a warm-up. The table gives, per runner, the best tokens/s of the rounds on the wall
clock (from the call to the last token, prompt included: the same prompt for every runner; on a
machine shared with other jobs the best round is the one least disturbed, medians swing 3x
there), its ratio to mlx-lm's best, the CPU-time speedup (mlx-lm's median CPU seconds,
``time.process_time``, over the runner's: other processes barely move it), tokens per forward
pass (``generated / (generated - accepted)``) and the share of proposed candidates accepted.

Two modes without the side-by-side timing: ``--rules`` replays Hugging Face's candidate rule
and ours on the same fixed greedy outputs (tokens per pass, acceptance, and a speed-up modelled
with ``VERIFY_COST``); ``--verify-cost`` times one verification by number of candidates, beside
a plain step of mlx-lm's loop (where ``VERIFY_COST`` comes from).

With ``--draft FOLDER`` (made by ``train_draft.py``: a 2-layer, 128-wide OpenELM trained on the
same corpus) the trained tiny model also runs speculative decoding with that draft, mlx-lm's
``stream_generate(draft_model=...)`` beside ours (which is mlx-lm's loop behind our options),
for each ``--num-draft`` K; "accepted" is then the accepted draft tokens over K per target
pass. Not measured: a 270M model drafting for a bigger one. No trained OpenELM larger than the
tiny one is available offline, and random weights would accept nothing of each other's drafts.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        nice python benchmarks/bench_decoding.py --write   # replaces ## Decoding in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from bench_blas import RESULTS, machine_line, replace_section
from mlx.utils import tree_flatten

import mlx_openelm
from mlx_openelm.config import ModelArgs
from mlx_openelm.folder import write_model_folder
from mlx_openelm.generate_options import DEFAULT_LOOKUP_NGRAM
from mlx_openelm.lookup import LookupStats
from mlx_openelm.model import Model
from mlx_openelm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "data" / "llama2-tokenizer" / "tokenizer.model"
TRAINED = SHARED / "models" / "openelm-tiny-shakespeare"
VALID = SHARED / "data" / "shakespeare" / "valid.jsonl"
KINDS = ("continue", "quote", "question")


def passage(chars: int) -> str:
    """A stretch of Othello that starts at a speaker's line."""
    text = "".join(json.loads(line)["text"] for line in VALID.read_text().splitlines()[1:6])
    start = text.index("IAGO.")
    cut = text.rfind("\n", start, start + chars)
    return text[start : cut if cut > start else start + chars]


def prompts(chars: int) -> dict[str, str]:
    p = passage(chars)
    first = p.split("\n")[0] + "\n" + p.split("\n")[1]
    return {
        "continue": p + "\n\n",
        "quote": p + "\n\n" + first,
        "question": p + "\n\nQuestion: Who is Iago speaking to, and what does he want?\nAnswer:",
    }


def trained_folder(root: Path) -> Path:
    from mlx_openelm.convert import convert

    out = root / "tiny-shakespeare"
    convert(TRAINED, out, tokenizer=TOKENIZER, dtype="float32")
    return out


def random_folder(root: Path, preset: str) -> Path:
    args = ModelArgs.from_preset(preset)
    mx.random.seed(0)
    model = Model(args)
    out = root / preset
    write_model_folder(out, args.to_dict(), tree_flatten(model.parameters()), Tokenizer(TOKENIZER))
    return out


def no_eos(wrapper):
    wrapper.eos_token_ids = set()  # fixed-length runs
    return wrapper


def timed(stream, model, tok, ids: list[int], n: int, **kw) -> dict:
    stats = LookupStats()
    if "prompt_lookup_num_tokens" in kw:
        kw["lookup_stats"] = stats
    tic, cpu = time.perf_counter(), time.process_time()
    responses = list(stream(model, tok, ids, max_tokens=n, **kw))
    seconds, cpu = time.perf_counter() - tic, time.process_time() - cpu
    tokens = [r.token for r in responses]
    accepted, acc = stats.accepted, stats.acceptance
    if "draft_model" in kw:  # accepted draft tokens; proposed: num_draft_tokens per target pass
        accepted = sum(r.from_draft for r in responses)
        acc = accepted / ((len(tokens) - accepted) * kw["num_draft_tokens"])
    per_pass = len(tokens) / (len(tokens) - accepted)
    return {"tps": len(tokens) / seconds, "cpu": cpu, "tokens": tokens, "acc": acc,
            "per_pass": per_pass}  # fmt: skip


def bench_model(folder: Path, args: argparse.Namespace) -> dict:
    import mlx_lm

    ours, our_tok = mlx_openelm.load(folder)
    theirs, their_tok = mlx_lm.load(str(folder))
    ours_tok = no_eos(our_tok.to_mlx_lm())
    runners = {
        "mlx-lm": lambda ids, n: timed(mlx_lm.stream_generate, theirs, no_eos(their_tok), ids, n),
        "ours plain": lambda ids, n: timed(mlx_openelm.stream_generate, ours, ours_tok, ids, n),
    }
    for k in args.lookup:
        runners[f"ours lookup {k}"] = lambda ids, n, k=k: timed(
            mlx_openelm.stream_generate, ours, ours_tok, ids, n, prompt_lookup_num_tokens=k
        )
    for g in args.ngram_compare:
        runners[f"ours lookup {max(args.lookup)}, n-gram <= {g}"] = lambda ids, n, g=g: timed(
            mlx_openelm.stream_generate, ours, ours_tok, ids, n,
            prompt_lookup_num_tokens=max(args.lookup), prompt_lookup_max_ngram=g,
        )  # fmt: skip
    if args.draft is not None and folder.name == "tiny-shakespeare":
        our_draft, _ = mlx_openelm.load(args.draft)
        their_draft, _ = mlx_lm.load(str(args.draft))
        for k in args.num_draft:
            runners[f"mlx-lm draft {k}"] = lambda ids, n, k=k: timed(
                mlx_lm.stream_generate, theirs, no_eos(their_tok), ids, n,
                draft_model=their_draft, num_draft_tokens=k,
            )  # fmt: skip
            runners[f"ours draft {k}"] = lambda ids, n, k=k: timed(
                mlx_openelm.stream_generate, ours, ours_tok, ids, n,
                draft_model=our_draft, num_draft_tokens=k,
            )  # fmt: skip
    out: dict[str, dict] = {}
    for kind, text in prompts(args.chars).items():
        ids = our_tok.encode(text, add_bos=True)
        for run in runners.values():
            run(ids, 4)  # warm-up
        rows: dict[str, list[dict]] = {name: [] for name in runners}
        names = list(runners)
        for i in range(args.rounds):
            for name in names if i % 2 == 0 else names[::-1]:
                rows[name].append(runners[name](ids, args.tokens))
        same = all(r["tokens"] == rows["mlx-lm"][0]["tokens"] for rs in rows.values() for r in rs)
        out[kind] = {"prompt_tokens": len(ids), "rows": rows, "same": same}
    return out


def hf_candidates(ids: list[int], num_tokens: int, max_ngram: int) -> list[int]:
    """Hugging Face's PromptLookupCandidateGenerator rule: the earliest occurrence of the
    longest suffix n-gram whose continuation is non-empty, cut at the end of the text."""
    for n in range(max_ngram, 0, -1):
        suffix = ids[-n:]
        for i in range(len(ids) - n):
            if ids[i : i + n] == suffix:
                return ids[i + n : i + n + num_tokens]
    return []


VERIFY_COST = (1.39, 0.15)  # a verification of k candidates, in pipelined plain steps: a + b·k


def simulate(propose, ids: list[int], gen: list[int], width_max: int) -> tuple[float, ...]:
    """Tokens per forward pass, acceptance and modelled speed-up (``VERIFY_COST``, measured with
    ``--verify-cost``) of a proposer replayed on a fixed greedy output (our adaptive width, no
    back-off): what each rule would have verified, with no timing."""
    known, t, passes, accepted, proposed, width = list(ids), 0, 0, 0, 0, width_max
    cost = 0.0
    while t < len(gen):
        cands = propose(known, min(width, len(gen) - t - 1))
        a = 0
        while a < len(cands) and cands[a] == gen[t + a]:
            a += 1
        known += gen[t : t + a + 1]
        t, passes, accepted, proposed = t + a + 1, passes + 1, accepted + a, proposed + len(cands)
        cost += VERIFY_COST[0] + VERIFY_COST[1] * len(cands) if cands else 1.0
        if cands:
            width = min(width + 2, width_max) if a == len(cands) else max(width - 1, 1)
    return len(gen) / passes, accepted / max(proposed, 1), len(gen) / cost


def verify_cost(folder: Path, widths: tuple[int, ...] = (0, 2, 5, 10)) -> str:
    """Median wall time of one verification (``model([last] + k)``, then reading the argmax) by
    k, beside a plain step of mlx-lm's pipelined loop (its tok/s over 128 tokens)."""
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = mlx_openelm.load(folder)
    ids = mx.array([tok.encode(prompts(900)["quote"], add_bos=True)])
    lines = ["| candidates k | verification ms |", "|---:|---:|"]
    for k in widths:
        cache = make_prompt_cache(model)
        model(ids, cache=cache)
        mx.eval([c.state for c in cache])
        x, times = mx.array([[5] * (k + 1)]), []
        for _ in range(60):
            tic = time.perf_counter()
            mx.argmax(model(x, cache=cache), axis=-1).tolist()
            times.append(time.perf_counter() - tic)
            for c in cache:
                c.trim(k + 1)
        lines.append(f"| {k} | {statistics.median(times) * 1e3:.2f} |")
    theirs, their_tok = mlx_lm.load(str(folder))
    runs = [timed(mlx_lm.stream_generate, theirs, no_eos(their_tok), ids[0].tolist(), 128)
            for _ in range(3)]  # fmt: skip
    lines.append(f"\nmlx-lm plain step: {1e3 / max(r['tps'] for r in runs):.2f} ms (best of 3)")
    return "\n".join(lines)


def rules_table(name: str, folder: Path, args: argparse.Namespace) -> str:
    """Hugging Face's candidate rule vs ours on the same greedy outputs, per prompt and N."""
    from mlx_openelm.lookup import NGramIndex

    model, tok = mlx_openelm.load(folder)
    wrapper = no_eos(tok.to_mlx_lm())
    rules = {
        "Hugging Face (earliest, n-gram <= 2)": lambda known, k: hf_candidates(known, k, 2),
        "ours (latest, LZ77 copy, n-gram <= 2)": lambda known, k: NGramIndex(known, 2).propose(k),
        f"ours, n-gram <= {DEFAULT_LOOKUP_NGRAM} (default)": lambda known, k: NGramIndex(
            known, DEFAULT_LOOKUP_NGRAM
        ).propose(k),
    }
    lines = [f"**{name}** ({args.tokens} greedy tokens)", "",
             "| prompt | N | " + " | ".join(f"{r}: tokens/pass, accepted, modelled speed-up"
                                            for r in rules) + " |",
             "|---|---:|" + "---:|" * len(rules)]  # fmt: skip
    for kind, text in prompts(args.chars).items():
        ids = tok.encode(text, add_bos=True)
        gen = [r.token for r in mlx_openelm.stream_generate(model, wrapper, ids, args.tokens)]
        for n in args.lookup:
            cells = [simulate(rule, ids, gen, n) for rule in rules.values()]
            lines.append(f"| {kind} | {n} | " + " | ".join(
                f"{p:.2f}, {a:.0%}, {x:.2f}x" for p, a, x in cells) + " |")  # fmt: skip
    return "\n".join(lines)


def table(name: str, result: dict, tokens: int) -> str:
    lines = [
        f"**{name}** ({tokens} tokens per run)",
        "",
        "| prompt | runner | best tok/s | vs mlx-lm | CPU-time speedup | tokens/pass | "
        "accepted | same tokens |",
        "|---|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for kind, r in result.items():
        base = max(x["tps"] for x in r["rows"]["mlx-lm"])
        base_cpu = statistics.median(x["cpu"] for x in r["rows"]["mlx-lm"])
        for runner, rows in r["rows"].items():
            tps, cpu = max(x["tps"] for x in rows), statistics.median(x["cpu"] for x in rows)
            acc = f"{rows[0]['acc']:.0%}" if "lookup" in runner or "draft" in runner else ""
            lines.append(
                f"| {kind} ({r['prompt_tokens']} tok) | {runner} | {tps:.1f} | "
                f"{tps / base:.2f}x | {base_cpu / cpu:.2f}x | {rows[0]['per_pass']:.2f} | {acc} | "
                f"{'yes' if r['same'] else 'NO'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-shakespeare,270M")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--tokens-270m", type=int, default=48)
    parser.add_argument("--chars", type=int, default=900, help="passage length in characters")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lookup", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument(
        "--ngram-compare",
        type=int,
        nargs="*",
        default=[2],
        help="also run the largest N with these longest n-grams (default: 2, Hugging Face's)",
    )
    parser.add_argument(
        "--draft",
        type=Path,
        help="a draft for the trained tiny model (train_draft.py): adds draft-model rows",
    )
    parser.add_argument("--num-draft", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--write", action="store_true", help="replace ## Decoding in RESULTS.md")
    parser.add_argument(
        "--rules",
        action="store_true",
        help="only compare candidate rules on fixed greedy outputs (no timing)",
    )
    parser.add_argument(
        "--verify-cost", action="store_true", help="only time one verification by candidates"
    )
    args = parser.parse_args()
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "tiny-shakespeare":
                folder, n = trained_folder(Path(tmp)), args.tokens
            else:
                folder, n = random_folder(Path(tmp), name), args.tokens_270m
            opts = argparse.Namespace(**{**vars(args), "tokens": n})
            if args.verify_cost:
                tables.append(f"**{name}**\n\n" + verify_cost(folder))
                print(tables[-1], flush=True)
                continue
            if args.rules:
                tables.append(rules_table(name, folder, opts))
                print(tables[-1], flush=True)
                continue
            result = bench_model(folder, opts)
            tables.append(table(name, result, n))
            print(tables[-1], flush=True)
    if args.write and not (args.rules or args.verify_cost):
        body = machine_line() + "\n\n" + "\n\n".join(tables) + "\n"
        RESULTS.write_text(replace_section(RESULTS.read_text(), "Decoding", body))


if __name__ == "__main__":
    main()
