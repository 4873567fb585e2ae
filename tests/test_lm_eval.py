"""The lm-eval backend on the trained checkpoint: the harness gets `eval choice`'s numbers.

Every request type is checked against an independent computation: log-likelihoods against
`eval choice` and a float64 NumPy forward, rolling log-likelihoods against `eval perplexity` and
the float64 forward over lm-eval's own windows, generation against `generate`; the few-shot
prompt against the string lm-eval's documented format gives.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
from lora_helpers import write_random_lora
from typer.testing import CliRunner

from openelm_ref import forward, log_softmax

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed: pip install -e '.[eval]' (dev includes it)"
)

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from mlx_openelm.cli import app  # noqa: E402
from mlx_openelm.evaluate import (  # noqa: E402
    evaluate_choice,
    perplexity,
    read_choice_tasks,
)
from mlx_openelm.generate import generate  # noqa: E402
from mlx_openelm.lm_eval_backend import OpenELMLM  # noqa: E402
from mlx_openelm.lm_eval_run import (  # noqa: E402
    LMEvalOptions,
    paper_rows,
    run_lm_eval,
    use_local_datasets,
)

CHECKPOINT = SHARED / "models" / "openelm-tiny-shakespeare"
TOKENIZER = SHARED / "data" / "llama2-tokenizer" / "tokenizer.model"
VALID = SHARED / "data" / "shakespeare" / "valid.jsonl"
HEAD_DIM = 32
runner = CliRunner()

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    train: {train}
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _questions(texts: list[str], n: int, seed: int) -> list[dict]:
    """Next-words questions from held-out Shakespeare: the true words and three from elsewhere."""
    rng = random.Random(seed)
    words = [t.split() for t in texts if len(t.split()) > 40]
    out = []
    for i in range(n):
        w = words[i]
        cut = rng.randint(8, 20)
        choices = [" ".join(w[cut : cut + 4])]
        choices += [" ".join(words[(i + k) % len(words)][30:34]) for k in (7, 13, 21)]
        order = list(range(4))
        rng.shuffle(order)
        out.append(
            {
                "context": " ".join(w[:cut]),
                "choices": [choices[j] for j in order],
                "answer": order.index(0),
            }
        )
    return out


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def shk(tmp_path_factory):
    """(folder, backend, float64 weights, task dir, test JSONL, train records) on the checkpoint."""
    if not (CHECKPOINT / "model.safetensors").is_file() or not TOKENIZER.is_file():
        pytest.skip(f"trained checkpoint or tokenizer not under {SHARED} (../shared absent)")
    from safetensors.numpy import load_file

    from mlx_openelm.convert import convert

    root = tmp_path_factory.mktemp("lm_eval")
    folder = root / "shk"
    convert(CHECKPOINT, folder, dtype="float32", tokenizer=TOKENIZER)
    texts = [json.loads(line)["text"] for line in VALID.read_text().splitlines()[:60]]
    test = _write_jsonl(root / "test.jsonl", _questions(texts, 4, seed=0))
    train_records = _questions(texts[30:], 2, seed=1)
    train = _write_jsonl(root / "train.jsonl", train_records)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "shk.yaml").write_text(TASK_YAML.format(name="shk_choice", test=test, train=train))
    ref = load_file(str(CHECKPOINT / "model.safetensors"))
    lm = OpenELMLM(pretrained=str(folder), on_progress=lambda *a: None)
    use_local_datasets(offline=True)
    return folder, lm, ref, tasks, test, train_records


class Recorder:
    """Wraps the backend's loglikelihood to keep what the harness asked and what it got."""

    def __init__(self, lm: OpenELMLM) -> None:
        self.lm, self.calls = lm, []
        self.inner = lm.loglikelihood

    def __enter__(self):
        def wrapped(requests):
            results = self.inner(requests)
            self.calls += [(r.args, res) for r, res in zip(requests, results)]
            return results

        self.lm.loglikelihood = wrapped
        return self

    def __exit__(self, *exc):
        del self.lm.loglikelihood


def _ref_logprob(ref, tokens: list[int], first: int) -> float:
    """Float64 summed log p(tokens[t]) for t >= first, given everything before."""
    logp = log_softmax(forward(ref, tokens, head_dim=HEAD_DIM))
    return float(sum(logp[t - 1, tokens[t]] for t in range(first, len(tokens))))


def test_harness_loglikelihoods_equal_eval_choice_and_float64(shk):
    folder, lm, ref, tasks, test, _ = shk
    with Recorder(lm) as rec:
        results = run_lm_eval(lm, LMEvalOptions(("shk_choice",), include_path=tasks))
    questions = read_choice_tasks(test)
    ours = evaluate_choice(lm.model, lm.tok, questions)  # what `eval choice` computes
    by_pair = {args: ll for args, (ll, _) in rec.calls}
    assert len(by_pair) == sum(len(q.choices) for q in questions) == 16
    for i, q in enumerate(questions):
        harness = [by_pair[(q.context, " " + c)] for c in q.choices]
        assert harness == ours.loglikelihoods[i]  # exactly
        if i >= 2:
            continue  # the float64 forward is slow: two questions (8 sequences) are enough
        for c, ll in zip(q.choices, harness):
            ctx = lm.tok.encode(q.context, add_bos=True)
            whole = lm.tok.encode(q.context + " " + c, add_bos=True)
            assert ll == pytest.approx(_ref_logprob(ref, whole, len(ctx)), rel=1e-4)
    scores = results["results"]["shk_choice"]
    assert scores["acc,none"] == ours.acc and scores["acc_norm,none"] == ours.acc_norm
    assert scores["acc_stderr,none"] == pytest.approx(ours.acc_stderr)


def test_is_greedy_marks_the_greedy_continuation(shk):
    _, lm, _, _, _, _ = shk
    context = "ROMEO:\nBut soft, what light"
    text = generate(lm.model, lm.tok, lm.tok.encode(context, add_bos=True), 3)
    text = " " + text  # the detokenizer drops the first token's word-start space, as HF's does
    reqs = [Instance("loglikelihood", {}, (context, c), 0) for c in (text, " zebra quantum")]
    (_, greedy), (_, other) = lm.loglikelihood(reqs)
    assert greedy is True and other is False


def _rolling(lm, text: str) -> float:
    return lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]


def test_rolling_equals_eval_perplexity_and_float64_windows(shk):
    _, lm, ref, _, _, _ = shk
    text = json.loads(VALID.read_text().splitlines()[3])["text"][:600]
    ids = lm.tok.encode(text, add_bos=False)
    # One window: the whole text after BOS, exactly what `eval perplexity` scores.
    p = perplexity(lm.model, lm.tok, [text], seq_len=2048, batch_size=lm.batch_size)
    assert _rolling(lm, text) == -p.nll * p.tokens and p.tokens == len(ids)
    # Many windows: lm-eval's rolling windows of L tokens are HF's of L + 1 tokens with stride L
    # when the text is a whole number of windows long.
    lm.max_length, L = 32, 32
    try:
        cut = lm.tok.decode(ids[: 3 * L])
        assert len(lm.tok.encode(cut, add_bos=False)) == 3 * L
        rolling = _rolling(lm, cut)
    finally:
        lm.max_length = 2048
    p = perplexity(lm.model, lm.tok, [cut], seq_len=L + 1, stride=L, batch_size=lm.batch_size)
    assert p.windows == 3 and rolling == pytest.approx(-p.nll * p.tokens, rel=1e-6)
    windows = map(make_disjoint_window, get_rolling_token_windows(ids[: 3 * L], 1, L, 1))
    expected = sum(_ref_logprob(ref, c + t, len(c)) for c, t in windows)
    assert rolling == pytest.approx(expected, rel=1e-4)


def test_generate_until_equals_generate_with_the_stop_strings(shk):
    _, lm, _, _, _, _ = shk
    contexts = ["ROMEO:\n", "KING HENRY:\nNow, my lords,"]
    kwargs = {"until": ["\n\n", "."], "max_gen_toks": 40}
    reqs = [Instance("generate_until", {}, (c, kwargs), i) for i, c in enumerate(contexts)]
    got = lm.generate_until(reqs)
    for c, text in zip(contexts, got):
        ids = lm.tok.encode(c, add_bos=True)
        assert text == generate(lm.model, lm.tok, ids, 40, stop=["\n\n", "."])
        assert "." not in text and "\n\n" not in text
        assert text == generate(lm.model, lm.tok, ids, 40).split(".")[0].split("\n\n")[0]


def test_fewshot_prompt_is_rendered_like_lm_eval(shk):
    _, lm, _, tasks, test, train = shk
    with Recorder(lm) as rec:
        options = LMEvalOptions(("shk_choice",), num_fewshot=2, limit=1, include_path=tasks)
        run_lm_eval(lm, options)
    shots = [f"{t['context']} {t['choices'][t['answer']]}" for t in train]
    q = read_choice_tasks(test)[0]
    # lm-eval: examples joined by fewshot_delimiter "\n\n", then the question (random order).
    renders = {"\n\n".join([a, b, q.context]) for a, b in (shots, shots[::-1])}
    contexts = {args[0] for args, _ in rec.calls if args[0].endswith(q.context)}
    assert len(contexts) == 1 and contexts <= renders


def test_cli_lm_eval_table_output_and_slice(shk, tmp_path):
    folder, _, _, tasks, test, _ = shk
    out = tmp_path / "results.json"
    args = ["eval", "lm-eval", "-m", str(folder), "--tasks", "shk_choice"]
    args += ["--include-path", str(tasks), "--offline", "--offset", "1", "--limit", "2"]
    result = runner.invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "shk_choice" in result.stdout and "acc_norm" in result.stdout
    saved = json.loads(out.read_text())["results"]["shk_choice"]
    lm = OpenELMLM(pretrained=str(folder), on_progress=lambda *a: None)
    expected = evaluate_choice(lm.model, lm.tok, read_choice_tasks(test)[1:3])
    assert saved["sample_len"] == 2 and saved["acc,none"] == expected.acc
    assert not list(tmp_path.glob(".*.tmp"))


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_bad_inputs_are_one_line(shk, tmp_path):
    folder, _, _, tasks, test, _ = shk
    base = ["eval", "lm-eval", "-m", str(folder), "--include-path", str(tasks), "--offline"]
    line = _error_line(runner.invoke(app, [*base, "--tasks", "shk_choice", "--num-fewshot", "5"]))
    assert "--num-fewshot 5" in line and "(2)" in line
    line = _error_line(runner.invoke(app, [*base, "--tasks", "shk_choice", "--offset", "99"]))
    assert "--offset 99" in line and "4 documents" in line
    missing = tmp_path / "missing"
    missing.mkdir()
    yaml = TASK_YAML.format(name="gone", test=test, train=test)
    (missing / "gone.yaml").write_text(yaml.replace("dataset_path: json", "dataset_path: nobody/x"))
    gone = [*base[:4], "--include-path", str(missing), "--tasks", "gone", "--offline"]
    line = _error_line(runner.invoke(app, gone))
    assert "'nobody/x' is not available offline" in line and "--data-dir" in line
    chat = [*base, "--tasks", "shk_choice", "--apply-chat-template"]
    line = _error_line(runner.invoke(app, chat))
    assert "no chat template" in line


PAPER_TASK_DIRS = ("arc", "piqa", "super_glue/boolq", "hellaswag", "sciq", "winogrande")


@pytest.fixture
def paper_tasks_only(monkeypatch):
    """lm-eval's real YAML for the paper's tasks, without indexing its thousands of others."""
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.__file__).parent / "tasks"
    dirs = [str(root / d) for d in PAPER_TASK_DIRS]

    def manager(include_path):
        extra = [include_path] if include_path else []
        return TaskManager(include_path=dirs + extra, include_defaults=False)

    monkeypatch.setattr("mlx_openelm.lm_eval_run._full_task_manager", manager)


def test_cli_unknown_task_and_missing_paper_dataset(shk, paper_tasks_only):
    folder = str(shk[0])
    line = _error_line(runner.invoke(app, ["eval", "lm-eval", "-m", folder, "--tasks", "arc_esy"]))
    assert "unknown lm-eval task 'arc_esy'" in line and "arc_easy" in line
    args = ["eval", "lm-eval", "-m", folder, "--preset", "openelm-paper", "--offline"]
    line = _error_line(runner.invoke(app, args))
    assert "task 'arc_challenge'" in line and "allenai/ai2_arc" in line
    assert "datasets.load_dataset('allenai/ai2_arc', 'ARC-Challenge')" in line


def test_paper_table_for_each_size():
    cfg_270m = {"num_transformer_layers": 16, "model_dim": 1280}
    results = {"results": {"arc_easy": {"acc_norm,none": 0.5}, "boolq": {"acc,none": 0.25}}}
    rows = {r.task: r for r in paper_rows(results, cfg_270m)}
    assert len(rows) == 7 and rows["arc_easy"].ours == 50.0 and rows["boolq"].ours == 25.0
    assert rows["winogrande"].ours is None and rows["winogrande"].metric == "acc"
    assert rows["winogrande"].paper == {"OpenELM-270M": 53.91, "OpenELM-270M-Instruct": 52.72}
    assert np.isclose(sum(r.paper["OpenELM-270M"] for r in rows.values()) / 7, 54.37, atol=0.01)
    assert all(r.paper == {} for r in paper_rows(results, {"num_transformer_layers": 4}))


def test_registered_for_lm_eval_by_name_and_entry_point():
    from importlib.metadata import entry_points

    from lm_eval.api.registry import get_model

    assert get_model("mlx-openelm") is OpenELMLM
    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "mlx-openelm"]
    assert ep.load() is OpenELMLM


def test_adapter_is_applied_and_a_foreign_one_is_one_line(shk, tiny_model_dir, tmp_path):
    from mlx_openelm.evaluate import ChoiceQuestion, choice_loglikelihoods
    from mlx_openelm.generate import load_for_generation

    folder, plain, _, tasks, _, _ = shk
    adapter = write_random_lora(folder, tmp_path / "ours")
    lm = OpenELMLM(pretrained=str(folder), adapter_path=str(adapter), on_progress=lambda *a: None)
    q = ChoiceQuestion("ROMEO:\nBut soft, what light", ("through yonder", "is the east"), 0)
    reqs = [Instance("loglikelihood", {}, (q.context, " " + c), 0) for c in q.choices]
    got = [ll for ll, _ in lm.loglikelihood(reqs)]
    model, tok, _ = load_for_generation(folder, adapter_path=adapter)
    assert got == choice_loglikelihoods(model, tok, q)
    assert got != [ll for ll, _ in plain.loglikelihood(reqs)]
    foreign = write_random_lora(tiny_model_dir, tmp_path / "foreign")
    args = ["eval", "lm-eval", "-m", str(folder), "--tasks", "shk_choice", "--offline"]
    line = _error_line(runner.invoke(app, [*args, "--include-path", str(tasks), "--adapter",
                                           str(foreign)]))  # fmt: skip
    assert "adapter" in line.lower()


def test_lm_eval_own_command_line_runs_the_backend(shk, monkeypatch, capsys):
    """`python -m mlx_openelm.lm_eval_backend` is lm-eval's CLI with `--model mlx-openelm`."""
    import functools

    import lm_eval.tasks

    from mlx_openelm.lm_eval_backend import main

    folder, _, _, tasks, _, _ = shk
    # Index only --include_path (lm-eval's thousands of built-in task files take seconds).
    local = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local)
    argv = ["lm-eval", "run", "--model", "mlx-openelm", "--model_args", f"pretrained={folder}"]
    argv += ["--tasks", "shk_choice", "--include_path", str(tasks), "--limit", "2"]
    monkeypatch.setattr("sys.argv", argv)
    main()
    table = capsys.readouterr().out
    assert "mlx-openelm ({'pretrained'" in table and "|shk_choice|" in table
    assert "acc_norm" in table


def test_request_cache_resumes_a_run(shk, tmp_path):
    """With --cache, a rerun scores only the requests the last run did not get to."""
    _, lm, _, tasks, _, _ = shk
    cache = tmp_path / "requests"
    runs = []
    for limit in (1, 1, 2):
        with Recorder(lm) as rec:
            options = LMEvalOptions(("shk_choice",), limit=limit, include_path=tasks, cache=cache)
            run_lm_eval(lm, options)
        runs.append(len(rec.calls))
    assert runs == [4, 0, 4]


def test_apply_chat_template_renders_the_zephyr_prompt(shk, tiny_model_dir):
    _, _, _, tasks, test, _ = shk
    lm = OpenELMLM(pretrained=str(tiny_model_dir), on_progress=lambda *a: None)
    with Recorder(lm) as rec:
        options = LMEvalOptions(("shk_choice",), limit=1, include_path=tasks)
        run_lm_eval(lm, LMEvalOptions(**{**vars(options), "apply_chat_template": True}))
    q = read_choice_tasks(test)[0]
    assert {args[0] for args, _ in rec.calls} == {f"<|user|>\n{q.context}</s>\n<|assistant|>\n"}
    # lm-eval drops the target delimiter after a chat prompt: the answer starts the reply.
    assert [args[1] for args, _ in rec.calls] == list(q.choices)


def test_contexts_with_one_continuation_are_batched_with_the_same_scores(shk):
    """WinoGrande's shape: each option changes the context, the continuation is shared."""
    from mlx_openelm.evaluate import pair_scores

    _, lm, ref, _, _, _ = shk
    options = ["the Moor", "Desdemona", "Iago, that villain,", "my noble lord"]
    contexts = [f"I think {o} loves her, for" for o in options]
    cont = " she is fair and honest."
    reqs = [Instance("loglikelihood", {}, (c, cont), i) for i, c in enumerate(contexts)]
    lm.batch_size = 3  # two batches, one padded
    try:
        got = lm.loglikelihood(reqs)
    finally:
        lm.batch_size = 8
    for c, (ll, greedy) in zip(contexts, got):
        ((expected, expected_greedy),) = pair_scores(lm.model, lm.tok, c, [cont])
        assert ll == pytest.approx(expected, rel=1e-5) and greedy == expected_greedy
        ctx = lm.tok.encode(c, add_bos=True)
        whole = lm.tok.encode(c + cont, add_bos=True)
        assert ll == pytest.approx(_ref_logprob(ref, whole, len(ctx)), rel=1e-4)


def test_task_names_from_tasks_or_the_preset():
    from mlx_openelm.errors import DataError
    from mlx_openelm.lm_eval_run import task_names

    assert task_names(" arc_easy, hellaswag ,") == ("arc_easy", "hellaswag")
    assert task_names(None, "openelm-paper")[:2] == ("arc_challenge", "arc_easy")
    with pytest.raises(DataError, match="drop --tasks"):
        task_names("arc_easy", "openelm-paper")
    with pytest.raises(DataError, match="no tasks given"):
        task_names(" , ")
