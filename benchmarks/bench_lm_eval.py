"""lm-eval through our backend vs through ``mlx_lm.evaluate``: requests/s on one local task.

Both backends answer the same lm-eval multiple-choice task (a local JSONL of next-words questions
from held-out Shakespeare, four choices each, through a task YAML) on the same model folder, in one
process, timed around their ``loglikelihood`` calls (lm-eval's own task building is the same for
both and left out). Ours prefills each context once and scores its choices in one padded batch;
mlx-lm's ``MLXLM`` prefills once too but runs one forward per choice on a copy of the cache. Both
must give the same log-likelihoods (checked, rtol 1e-3).

    python benchmarks/bench_lm_eval.py                       # the trained tiny checkpoint
    python benchmarks/bench_lm_eval.py --preset 270M -q 16   # a random OpenELM-270M folder
    python benchmarks/bench_lm_eval.py --write   # also replace ## lm-eval [(PRESET)] in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_blas import RESULTS, TOKENIZER, machine_line, make_folder, replace_section

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINT = SHARED / "models" / "openelm-tiny-shakespeare"
VALID = SHARED / "data" / "shakespeare" / "valid.jsonl"
TASK = """task: bench_{shape}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {test}}}}}
test_split: test
output_type: multiple_choice
{docs}
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""
# choice: HellaSwag/ARC-like, 4 continuations of one context. partial: WinoGrande-like ("partial
# evaluation"), 2 contexts that differ in one word, one shared continuation.
DOCS = {  # doc_to_text, doc_to_choice, doc_to_target (an index as text: one input per choice)
    shape: f'doc_to_text: "{{{{{t}}}}}"\ndoc_to_choice: "{{{{{c}}}}}"\ndoc_to_target: "{{{{{g}}}}}"'
    for shape, (t, c, g) in {
        "choice": ("context", "choices", "answer"),
        "partial": ("answer", "contexts", "target"),
    }.items()
}
CHOICES = {"choice": 4, "partial": 2}


def write_task(folder: Path, shape: str, n: int, context_words: int, choice_words: int) -> Path:
    """A task YAML over ``n`` questions: ``context_words`` of a passage, then the next words."""
    rng = random.Random(0)
    texts = [json.loads(line)["text"].split() for line in VALID.read_text().splitlines()]
    texts = [t for t in texts if len(t) > context_words + choice_words + 40]
    records = []
    for i in range(n):
        w, cut = texts[i % len(texts)], context_words + rng.randint(0, 20)
        if shape == "partial":
            swap = texts[(i + 7) % len(texts)][cut]
            contexts = [" ".join(w[:cut]), " ".join([*w[: cut - 1], swap])]
            target = " ".join(w[cut : cut + choice_words])
            records.append({"contexts": contexts, "target": target, "answer": 0})
            continue
        choices = [" ".join(w[cut : cut + choice_words])]
        for k in (5, 11, 17):
            other = texts[(i + k) % len(texts)]
            choices.append(" ".join(other[: choice_words - rng.randint(0, 3)]))
        records.append({"context": " ".join(w[:cut]), "choices": choices, "answer": 0})
    data = folder / f"{shape}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "tasks").mkdir(exist_ok=True)
    (folder / "tasks" / f"{shape}.yaml").write_text(
        TASK.format(shape=shape, test=data, docs=DOCS[shape])
    )
    return folder / "tasks"


class Timed:
    """Wraps ``lm.loglikelihood``: seconds spent and the results, per call."""

    def __init__(self, lm) -> None:
        self.seconds, self.requests, self.results = 0.0, 0, []
        inner = lm.loglikelihood

        def timed(requests):
            t = time.perf_counter()
            out = inner(requests)
            self.seconds += time.perf_counter() - t
            self.requests += len(requests)
            self.results += [(r.args, float(o[0])) for r, o in zip(requests, out)]
            return out

        lm.loglikelihood = timed


def run(lm, tasks: Path, shape: str, limit: int) -> Timed:
    import lm_eval
    from lm_eval.tasks import TaskManager

    timed = Timed(lm)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    lm_eval.simple_evaluate(
        model=lm, tasks=[f"bench_{shape}"], task_manager=manager, limit=limit, log_samples=False
    )
    return timed


def backends(folder: Path, batch_size: int) -> dict:
    from mlx_lm.evaluate import MLXLM

    from mlx_openelm.lm_eval_backend import OpenELMLM

    return {
        "mlx-openelm (ours)": OpenELMLM(str(folder), batch_size=batch_size, on_progress=noop),
        "mlx_lm.evaluate": MLXLM(str(folder), batch_size=batch_size, use_chat_template=False),
    }


def noop(*_args) -> None:
    pass


def model_folder(a, tmp: Path) -> tuple[Path, str]:
    if a.preset:
        return make_folder(tmp / a.preset, a.preset, "float32", TOKENIZER), f"random {a.preset}"
    from mlx_openelm.convert import convert

    convert(CHECKPOINT, tmp / "shk", dtype="float32", tokenizer=TOKENIZER)
    return tmp / "shk", "the trained openelm-tiny-shakespeare (10.5M)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="random OpenELM of this size instead")
    ap.add_argument("--shape", choices=tuple(DOCS), default="choice")
    ap.add_argument("-q", type=int, default=32, help="questions")
    ap.add_argument("--context", type=int, default=60, help="context words (+0-20)")
    ap.add_argument("--choice", type=int, default=12, help="words per choice")
    ap.add_argument("-n", type=int, default=3, help="rounds, alternating the order")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, what = model_folder(a, Path(tmp))
        tasks = write_task(Path(tmp), a.shape, a.q, a.context, a.choice)
        lms = backends(folder, a.batch_size)
        rates: dict[str, list[float]] = {name: [] for name in lms}
        results = {}
        for r in range(a.n):
            for name, lm in list(lms.items())[:: 1 if r % 2 == 0 else -1]:
                t = run(lm, tasks, a.shape, a.q)
                rates[name].append(t.requests / t.seconds)
                results[name] = dict(t.results)
    ours, theirs = (results[n] for n in lms)
    keys = sorted(ours)
    np.testing.assert_allclose([ours[k] for k in keys], [theirs[k] for k in keys], rtol=1e-3)
    base = statistics.median(rates["mlx_lm.evaluate"])
    lines = ["| backend | requests/s | questions/s | vs mlx_lm.evaluate |"]
    lines.append("| --- | ---: | ---: | ---: |")
    for name, rs in rates.items():
        m = statistics.median(rs)
        lines.append(f"| {name} | {m:.1f} | {m / CHOICES[a.shape]:.2f} | {m / base:.2f}× |")
    table = "\n".join(lines) + "\n"
    shape = {
        "choice": f"4 choices of about {a.choice} words after one context",
        "partial": f"WinoGrande-style: 2 contexts one word apart, one {a.choice}-word continuation",
    }[a.shape]
    intro = (
        f"{machine_line()}\n\n{what}, float32; lm-eval {_version()}, a local multiple-choice task "
        f"of {a.q} questions ({a.context}-{a.context + 20} words of context; {shape}), batch "
        f"size {a.batch_size}, medians of {a.n} rounds, timed around `loglikelihood` (`python "
        f"benchmarks/bench_lm_eval.py{_flags(a)}`). Both backends give the same log-likelihoods "
        "(rtol 1e-3).\n\n"
    )
    print(intro + table)
    if a.write:
        parts = [x for x in (a.preset, a.shape if a.shape != "choice" else None) if x]
        title = "lm-eval" + "".join(f" ({x})" for x in parts)
        RESULTS.write_text(replace_section(RESULTS.read_text(), title, intro + table + "\n"))


def _version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def _flags(a) -> str:
    flags = f" --preset {a.preset} -q {a.q}" if a.preset else ""
    return flags + (f" --shape {a.shape}" if a.shape != "choice" else "")


if __name__ == "__main__":
    main()
