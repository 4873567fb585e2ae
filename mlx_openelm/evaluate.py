"""How good is a model: perplexity over text, and lm-eval style zero-shot multiple choice.

Perplexity follows Hugging Face's sliding-window recipe ("Perplexity of fixed-length models"):
windows of ``seq_len`` tokens start every ``stride`` tokens, and each window scores only the tokens
the previous window did not, so every scored token sees up to ``seq_len - stride`` tokens of
context from the overlap. Token counts are exact: a window's first token has no context inside
the window and is never a target (the guide subtracts one per window even when the first target
is not at the window start).

Multiple choice follows lm-evaluation-harness (the OpenELM paper scored ARC, BoolQ, HellaSwag,
PIQA, SciQ and WinoGrande with it, ``add_bos_token=True``): the continuation is ``delimiter +
choice``, encoded together with the context and split after the context's tokens; ``acc`` takes
the choice with the highest summed log-likelihood, ``acc_norm`` the highest log-likelihood per
character of the choice (lm-eval's ``len(choice)``). The context is run once per question into a
KV cache and all choices continue from it in one padded batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from . import fastmath
from .errors import DataError
from .jsonio import read_jsonl

Progress = Callable[[int, int], None]  # (done, total)


# --- Reading data files -------------------------------------------------------------------------


def _data_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass an existing text or JSONL file")
    return path


def _read_lines(path: str | Path) -> tuple[Path, list[str]]:
    path = _data_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); re-save it as UTF-8") from e
    if not text.strip():
        raise DataError(f"data file {path} is empty; it needs at least one example")
    return path, text.splitlines()


def _json_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for every non-blank line of a JSONL file; ``where`` is ``file:line``."""
    path = _data_path(path)
    records = read_jsonl(path, DataError, "fix or delete the line")
    if not records:
        raise DataError(f"data file {path} is empty; it needs at least one example")
    return [(f"{path}:{n}", record) for n, record in records]


def read_texts(path: str | Path) -> list[str]:
    """Documents for perplexity: a ``.jsonl`` file of ``{"text": ...}`` lines, else one text file.

    Raises:
        DataError: the file is missing, empty, not UTF-8, or a JSONL line is malformed (with
            ``file:line``).
    """
    if Path(path).suffix.lower() not in (".jsonl", ".ndjson"):
        return ["\n".join(_read_lines(path)[1])]
    texts = []
    for where, record in _json_records(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f'{where}: needs a string field "text", like {{"text": "..."}}')
        texts.append(text)
    return texts


@dataclass(frozen=True)
class ChoiceQuestion:
    """One multiple-choice question: ``choices[answer]`` is the correct continuation."""

    context: str
    choices: tuple[str, ...]
    answer: int


def read_choice_tasks(path: str | Path) -> list[ChoiceQuestion]:
    """Questions from a JSONL file of ``{"context", "choices": [...], "answer": index}`` lines.

    Raises:
        DataError: missing/empty file, malformed line, fewer than two choices, or ``answer`` not
            an index into ``choices`` (each with ``file:line``).
    """
    questions = []
    for where, r in _json_records(path):
        context, choices, answer = r.get("context"), r.get("choices"), r.get("answer")
        if not isinstance(context, str):
            raise DataError(f'{where}: needs a string field "context"')
        if not (isinstance(choices, list) and len(choices) >= 2):
            raise DataError(f'{where}: "choices" must be a list of at least two strings')
        if not all(isinstance(c, str) and c for c in choices):
            raise DataError(f'{where}: every entry of "choices" must be a non-empty string')
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise DataError(f'{where}: "answer" must be an integer index into "choices"')
        if not 0 <= answer < len(choices):
            raise DataError(
                f'{where}: "answer" is {answer} but there are {len(choices)} choices '
                f"(valid: 0..{len(choices) - 1})"
            )
        questions.append(ChoiceQuestion(context, tuple(choices), answer))
    return questions


# --- Perplexity ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored
    windows: int
    documents: int


def window_spans(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Hugging Face's sliding windows over ``n_tokens`` as ``(begin, end, first_target)``.

    Window ``[begin, end)`` scores the tokens ``[first_target, end)``: those not scored by the
    previous window, never the window's own first token (it has no context inside the window).
    """
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return spans


def _check_windows(seq_len: int, stride: int, batch_size: int) -> None:
    if seq_len < 2:
        raise DataError(f"seq_len (--seq-len) is {seq_len}; it must be at least 2 tokens")
    if not 1 <= stride <= seq_len:
        raise DataError(
            f"stride (--stride) is {stride}; it must be between 1 and seq_len ({seq_len})"
        )
    if batch_size < 1:
        raise DataError(f"batch_size (--batch-size) is {batch_size}; it must be at least 1")


def _windows_nll(model: Any, windows: list[list[int]], first: list[int]) -> list[float]:
    """Summed NLL of each window's targets; windows share one length. ``first`` is relative."""
    tokens = mx.array(windows)  # (B, L)
    logits = model(tokens[:, :-1]).astype(mx.float32)  # (B, L-1, V): position i predicts i+1
    logp = logits - fastmath.logsumexp(logits)[..., None]
    target_logp = mx.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # (B, L-1)
    is_target = mx.arange(tokens.shape[1] - 1)[None] >= (mx.array(first)[:, None] - 1)
    nll = -(target_logp * is_target).sum(axis=-1)
    return [float(x) for x in nll.tolist()]


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    seq_len: int = 2048,
    stride: int | None = None,
    batch_size: int = 1,
    on_progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` over ``texts`` (each encoded on its own, with BOS).

    Args:
        model: an mlx-lm protocol model (``model(tokens (B, L)) -> logits``).
        tokenizer: anything with ``encode(text, add_bos=True)``.
        texts: documents; windows never cross a document boundary.
        seq_len: tokens per window (≥ 2).
        stride: step between window starts (1 ≤ stride ≤ seq_len; default ``seq_len // 2``);
            smaller gives every scored token more context and costs more windows.
        batch_size: windows of equal length run together.
        on_progress: called with ``(windows_done, windows_total)``.

    Raises:
        DataError: bad window settings (a window longer than the model's context too), or no
            text long enough to score a token.
    """
    stride = max(1, seq_len // 2) if stride is None else stride
    _check_windows(seq_len, stride, batch_size)
    context = getattr(getattr(model, "args", None), "max_context_length", None)
    if isinstance(context, int) and seq_len > context:
        raise DataError(
            f"seq_len (--seq-len) is {seq_len}, beyond the model's {context}-token context, where "
            f"its perplexity means nothing; use --seq-len {context} or less"
        )
    jobs: list[tuple[list[int], int]] = []  # (window tokens, first target relative to window)
    for text in texts:
        ids = tokenizer.encode(text, add_bos=True)
        jobs += [(ids[b:e], f - b) for b, e, f in window_spans(len(ids), seq_len, stride)]
    tokens = sum(len(w) - f for w, f in jobs)
    if tokens == 0:
        raise DataError("nothing to score: every text is shorter than 2 tokens; add more text")
    by_length: dict[int, list[tuple[list[int], int]]] = {}
    for job in jobs:
        by_length.setdefault(len(job[0]), []).append(job)
    nll, done = 0.0, 0
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            batch = group[i : i + batch_size]
            nll += sum(_windows_nll(model, [w for w, _ in batch], [f for _, f in batch]))
            done += len(batch)
            if on_progress is not None:
                on_progress(done, len(jobs))
    mean = nll / tokens
    return PerplexityResult(
        perplexity=math.exp(mean), nll=mean, tokens=tokens, windows=len(jobs), documents=len(texts)
    )


# --- Multiple choice ----------------------------------------------------------------------------


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation split: encode both together, cut after the context.

    Trailing spaces of the context move to the continuation first (``"Q: x "`` + ``"A"`` scores
    ``" A"``), so the boundary token is the one the model would see in running text. An empty
    context becomes just BOS.
    """
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation, add_bos=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tokenizer.encode(context, add_bos=True)
    whole = tokenizer.encode(context + continuation, add_bos=True)
    return context_ids, whole[len(context_ids) :]


def _repeat_cache(cache: list[Any], n: int) -> list[KVCache]:
    """A batch-``n`` copy of a batch-1 KV cache (one row per choice)."""
    copies = []
    for layer in cache:
        keys, values = layer.keys_and_values()  # (1, n_kv, offset, hd)
        c = KVCache()
        c.state = (mx.repeat(keys, n, axis=0), mx.repeat(values, n, axis=0), layer.offset)
        copies.append(c)
    return copies


def continuation_scores(
    model: Any, context: list[int], conts: list[list[int]]
) -> list[tuple[float, bool]]:
    """``(summed log-probability, is_greedy)`` of each continuation after ``context``.

    The context runs once into a KV cache; ``is_greedy`` says whether greedy decoding from the
    context would produce the continuation (lm-eval's second loglikelihood value).
    """
    cache = make_prompt_cache(model)
    first = model(mx.array([context]), cache=cache)[:, -1].astype(mx.float32)  # (1, V)
    first = first - fastmath.logsumexp(first)[..., None]
    heads = mx.array([c[0] for c in conts])
    scores = first[0][heads]  # (C,): log p(first token of each choice | context)
    greedy = mx.argmax(first[0]) == heads  # (C,)
    longest = max(len(c) for c in conts)
    if longest > 1:
        # Copy the context's keys/values once per choice; feed each choice but its last token,
        # right-padded (padding sits after every real token, so causal attention ignores it).
        batched = _repeat_cache(cache, len(conts))
        pad = [c + [0] * (longest - len(c)) for c in conts]
        tokens = mx.array(pad)  # (C, longest)
        logits = model(tokens[:, :-1], cache=batched).astype(mx.float32)  # (C, longest-1, V)
        logp = logits - fastmath.logsumexp(logits)[..., None]
        rest = mx.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        real = mx.arange(longest - 1)[None] < (mx.array([len(c) for c in conts])[:, None] - 1)
        scores = scores + (rest * real).sum(axis=-1)
        hits = (mx.argmax(logits, axis=-1) == tokens[:, 1:]) | ~real  # (C, longest-1)
        greedy = greedy & hits.all(axis=-1)
    return list(zip((float(x) for x in scores.tolist()), (bool(g) for g in greedy.tolist())))


def _continuation_logprobs(model: Any, context: list[int], conts: list[list[int]]) -> list[float]:
    """Summed log-probability of each continuation after ``context``; context runs once."""
    return [score for score, _ in continuation_scores(model, context, conts)]


def choice_loglikelihoods(
    model: Any,
    tokenizer: Any,
    question: ChoiceQuestion,
    delimiter: str = " ",
    max_length: int = 2048,
) -> list[float]:
    """Log-likelihood of ``delimiter + choice`` given the context, for every choice.

    A context too long for ``max_length`` loses tokens on the left, per choice, as in lm-eval
    (the model sees at most ``max_length`` tokens: context + choice minus its last token).

    Raises:
        DataError: a choice alone is longer than ``max_length`` tokens.
    """
    conts = [delimiter + c for c in question.choices]
    return [s for s, _ in pair_scores(model, tokenizer, question.context, conts, max_length)]


def check_continuations(
    context: str, texts: Sequence[str], conts: Sequence[list[int]], max_length: int
) -> None:
    """Raises DataError for a continuation with no token of its own or longer than max_length."""
    for text, cont in zip(texts, conts):
        if not cont:
            raise DataError(
                f"choice {text!r} adds no token after the context {context[-40:]!r} "
                "(it merges into the context's last token); use a delimiter such as ' '"
            )
        if len(cont) > max_length:
            raise DataError(f"a choice is {len(cont)} tokens, more than max_length={max_length}")


def pair_scores(
    model: Any, tokenizer: Any, context: str, continuations: Sequence[str], max_length: int = 2048
) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of each continuation string after one context string:
    lm-eval's ``loglikelihood`` of requests sharing a context (split by :func:`encode_pair`).

    Raises:
        DataError: a continuation adds no token, or alone is longer than ``max_length`` tokens.
    """
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    ctx = pairs[0][0]  # the context's tokens do not depend on the continuation
    conts = [cont for _, cont in pairs]
    check_continuations(context, continuations, conts, max_length)
    longest = max(len(c) for c in conts)
    if len(ctx) + longest <= max_length + 1:
        return continuation_scores(model, ctx, conts)
    # Too long: like lm-eval, each choice keeps as much context as fits beside it.
    return [continuation_scores(model, ctx[-(max_length + 1 - len(c)) :], [c])[0] for c in conts]


def _stderr(hits: Sequence[float]) -> float:
    """lm-eval's standard error of a mean: sample std (n - 1) / sqrt(n)."""
    n = len(hits)
    if n < 2:
        return float("nan")
    mean = sum(hits) / n
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n)


@dataclass(frozen=True, kw_only=True)
class ChoiceResult:
    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    questions: int
    loglikelihoods: list[list[float]]  # per question, per choice
    predictions: list[int]  # argmax of log-likelihood
    predictions_norm: list[int]  # argmax of log-likelihood per character


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # first maximum, like np.argmax


def evaluate_choice(
    model: Any,
    tokenizer: Any,
    questions: Sequence[ChoiceQuestion],
    delimiter: str = " ",
    max_length: int = 2048,
    on_progress: Progress | None = None,
) -> ChoiceResult:
    """Zero-shot multiple-choice accuracy, scored like lm-evaluation-harness.

    Args:
        model, tokenizer: as returned by :func:`mlx_openelm.load`.
        questions: e.g. from :func:`read_choice_tasks`.
        delimiter: put between context and choice (lm-eval's ``target_delimiter``).
        max_length: longest token sequence the model is given.
        on_progress: called with ``(questions_done, questions_total)``.

    Returns:
        ``acc``, ``acc_norm`` (log-likelihood divided by the choice's character count), their
        standard errors and every question's log-likelihoods and predictions.
    """
    if not questions:
        raise DataError("no questions to evaluate; the tasks file needs at least one line")
    lls, preds, preds_norm = [], [], []
    for i, q in enumerate(questions):
        ll = choice_loglikelihoods(model, tokenizer, q, delimiter, max_length)
        lls.append(ll)
        preds.append(_argmax(ll))
        preds_norm.append(_argmax([x / len(c) for x, c in zip(ll, q.choices)]))
        if on_progress is not None:
            on_progress(i + 1, len(questions))
    hits = [float(p == q.answer) for p, q in zip(preds, questions)]
    hits_norm = [float(p == q.answer) for p, q in zip(preds_norm, questions)]
    n = len(questions)
    return ChoiceResult(
        acc=sum(hits) / n,
        acc_norm=sum(hits_norm) / n,
        acc_stderr=_stderr(hits),
        acc_norm_stderr=_stderr(hits_norm),
        questions=n,
        loglikelihoods=lls,
        predictions=preds,
        predictions_norm=preds_norm,
    )
