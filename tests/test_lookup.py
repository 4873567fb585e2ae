"""Prompt lookup: HF's candidate rule, greedy token parity with plain decoding (penalties, a
reused cache, the plain fallback), and the sampling distribution against the exact one."""

from __future__ import annotations

import itertools
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from mlx_openelm.config import ModelArgs
from mlx_openelm.lookup import LookupStats, NGramIndex, Sampling, lookup_generate_step
from mlx_openelm.model import Model
from mlx_openelm.penalties import make_processors

from tiny import tiny_config


def tiny_model(vocab_size: int, seed: int = 0) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(tiny_config(vocab_size=vocab_size)))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model64() -> Model:
    return tiny_model(64)


def scan_candidates(
    ids: list[int], num_tokens: int, max_ngram: int, min_ngram: int = 1
) -> list[int]:
    """Our rule as a plain scan: the longest suffix n-gram (at least ``min_ngram`` tokens) with
    an earlier occurrence (one that ends before the suffix does), its latest such occurrence,
    and what followed it, repeated with the period of the match when it runs into the present."""
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        suffix = ids[-n:]
        for i in range(len(ids) - n - 1, -1, -1):  # latest first, the suffix itself excluded
            if ids[i : i + n] == suffix:
                copied = list(ids)
                for j in range(num_tokens):  # an LZ77 copy: may read what it just wrote
                    copied.append(copied[i + n + j])
                return copied[len(ids) :]
    return []


def test_candidates_match_a_plain_scan_of_the_rule():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, 6, size=int(rng.integers(1, 40))).tolist()
        for max_ngram, n in ((1, 3), (2, 10), (3, 5)):
            assert NGramIndex(ids, max_ngram).propose(n) == scan_candidates(ids, n, max_ngram), ids
        for max_ngram, min_ngram in ((4, 1), (4, 2), (4, 4), (3, 2)):
            got = NGramIndex(ids, max_ngram, min_ngram).propose(6)
            assert got == scan_candidates(ids, 6, max_ngram, min_ngram), ids
    index = NGramIndex([], 2)
    for t in rng.integers(0, 4, size=200).tolist():  # incremental == rebuilt from scratch
        index.append(t)
        assert index.propose(4) == scan_candidates(index.tokens, 4, 2)


def test_candidates_follow_the_latest_occurrence_and_repeat_a_loop():
    ids = [3, 4, 8, 1, 3, 4, 5, 6, 9, 3, 4]  # "3 4" at 0 (-> 8) and at 4 (-> 5 6 9): latest
    assert NGramIndex(ids, 2).propose(3) == [5, 6, 9]
    assert NGramIndex([1, 7, 7, 7], 2).propose(5) == [7, 7, 7, 7, 7]  # period 1, not one token
    assert NGramIndex([1, 2, 5, 1, 2], 2).propose(6) == [5, 1, 2, 5, 1, 2]  # period 3


def test_candidates_prefer_the_longest_ngram():
    ids = [7, 1, 2, 9, 9, 5, 2, 3, 4, 1, 2]  # "2" first matches at 2 (-> 9), "1 2" at 1 (-> 9 9)
    assert NGramIndex(ids, 2).propose(3) == [9, 9, 5]
    assert NGramIndex([5, 6, 5, 7, 6], 3).propose(2) == [5, 7]  # only "6" matches
    assert NGramIndex([1, 2, 3], 3).propose(4) == []


def test_shorter_matches_than_min_ngram_propose_nothing():
    ids = [5, 6, 5, 7, 6]  # only the 1-gram "6" matches
    assert NGramIndex(ids, 4, 1).propose(2) == [5, 7]
    assert NGramIndex(ids, 4, 2).propose(2) == []
    ids = [1, 2, 3, 9, 8, 2, 3]  # "2 3" matches (-> 9 8), nothing longer
    assert NGramIndex(ids, 4, 2).propose(2) == [9, 8]
    assert NGramIndex(ids, 4, 3).propose(2) == []


def plain_greedy(model, prompt, max_tokens, processors=()):
    steps = generate_step(
        mx.array(prompt, dtype=mx.uint32),
        model,
        max_tokens=max_tokens,
        logits_processors=list(processors),
    )
    return [t for t, _ in steps]


def lookup(model, prompt, max_tokens, cache=None, context=(), **kw):
    cache = cache if cache is not None else make_prompt_cache(model)
    steps = lookup_generate_step(
        mx.array(prompt, dtype=mx.uint32), model, cache=cache, context=context,
        max_tokens=max_tokens, **kw,
    )  # fmt: skip
    return [t for t, _, _ in steps], cache


@pytest.mark.parametrize("num_tokens", [1, 3, 10])
def test_greedy_is_token_identical_to_plain_decoding(model64, num_tokens):
    for seed in range(3):
        prompt = np.random.default_rng(seed).integers(3, 64, 30).tolist()
        stats = LookupStats()
        got, cache = lookup(model64, prompt, 60, num_tokens=num_tokens, stats=stats)
        assert got == plain_greedy(model64, prompt, 60)
        assert stats.accepted > 10  # lookup did the work
        assert cache[0].offset == len(prompt) + 60 - 1  # every token but the last is cached


def test_greedy_parity_with_penalties_and_plain_fallback(model64):
    """Context-scope repetition penalty, OpenAI penalties and a bias change every row's logits
    by its own history; rejected candidates send the loop to pipelined plain decoding."""
    prompt = np.random.default_rng(7).integers(3, 64, 40).tolist()
    options = dict(
        repetition_penalty=1.3, repetition_scope="context", presence_penalty=0.4,
        frequency_penalty=0.3, logit_bias={5: 2.0, 6: -1.0},
    )  # fmt: skip
    processors = make_processors(start=len(prompt), **options)
    stats = LookupStats()
    got, _ = lookup(model64, prompt, 80, num_tokens=5, logits_processors=processors, stats=stats)
    assert got == plain_greedy(model64, prompt, 80, processors)
    assert stats.proposed - stats.accepted > 5  # misses happened, so the fallback ran
    assert stats.verify_steps * 2 < 80  # and most tokens came from plain steps or acceptances


def test_greedy_parity_continuing_a_cached_prefix(model64):
    """The chat/server case: the cache holds an earlier turn, only the new tokens run, and lookup
    matches (and the penalty counts) the cached tokens too."""
    rng = np.random.default_rng(3)
    first, second = rng.integers(3, 64, 25).tolist(), rng.integers(3, 64, 6).tolist()
    turn1, cache = lookup(model64, first, 20, num_tokens=4)
    history = first + turn1  # the cache holds all of it but the last token
    assert cache[0].offset == len(history) - 1
    start = len(history) + len(second)
    penalty = dict(repetition_penalty=1.2, repetition_scope="context")
    got, _ = lookup(
        model64, [history[-1], *second], 30, cache=cache, context=history[:-1], num_tokens=4,
        logits_processors=make_processors(start=start, **penalty),
    )  # fmt: skip
    want = plain_greedy(model64, history + second, 30, make_processors(start=start, **penalty))
    assert got == want


def test_closing_early_leaves_only_yielded_tokens_cached(model64):
    prompt = np.random.default_rng(1).integers(3, 64, 30).tolist()
    cache = make_prompt_cache(model64)
    steps = lookup_generate_step(mx.array(prompt, dtype=mx.uint32), model64, cache=cache)
    got = [next(steps)[0] for _ in range(7)]
    steps.close()
    assert got == plain_greedy(model64, prompt, 7)
    assert cache[0].offset in (len(prompt) + 6, len(prompt) + 7)


# -- sampling: the distribution of the first tokens against the exact one --------------------

VOCAB, DEPTH = 8, 3


def exact_distribution(model, prompt, sampling: Sampling) -> dict[tuple[int, ...], float]:
    """P(first DEPTH tokens) under plain sampling: the sampler's distribution after each prefix,
    in float64, multiplied along every path (one forward pass per prefix of DEPTH - 1 tokens)."""
    probs: dict[tuple[int, ...], float] = {}
    for head in itertools.product(range(VOCAB), repeat=DEPTH - 1):
        logits = model(mx.array([prompt + list(head)], dtype=mx.uint32))[0, len(prompt) - 1 :]
        logp = sampling.log_distribution(logits - mx.logsumexp(logits, -1, keepdims=True))
        p = np.exp(np.array(logp).astype(np.float64))
        p /= p.sum(-1, keepdims=True)
        along = np.prod([p[i, t] for i, t in enumerate(head)])
        for last in range(VOCAB):
            probs[(*head, last)] = float(along * p[DEPTH - 1, last])
    return probs


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: dict, probs: dict, trials: int) -> tuple[float, int]:
    """Pearson's statistic, outcomes with expected count < 5 pooled into one cell."""
    small = [k for k, p in probs.items() if p * trials < 5]
    stat = sum((counts.get(k, 0) - p * trials) ** 2 / (p * trials)
               for k, p in probs.items() if k not in small)  # fmt: skip
    pooled_p, pooled_n = sum(probs[k] for k in small), sum(counts.get(k, 0) for k in small)
    if pooled_p > 0:
        stat += (pooled_n - pooled_p * trials) ** 2 / (pooled_p * trials)
    return stat, len(probs) - len(small) + (pooled_p > 0) - 1


@pytest.mark.parametrize(
    ("sampling", "trials"),
    [(Sampling(temp=1.0), 600), (Sampling(temp=0.8, top_p=0.9, top_k=5), 400)],
    ids=["temp1", "filtered"],
)
def test_sampling_distribution_is_unchanged(sampling, trials):
    """Chi-square of 400-600 lookup samples of the first three tokens against the exact
    distribution; candidates are accepted and rejected often (the prompt is the model's own
    greedy loop, whose next token has probability ~0.5). A rule that resampled from ``p``
    after a rejection (not ``p`` without the candidate) moves P(candidate) from ~0.5 to ~0.75."""
    model = tiny_model(VOCAB, seed=2)
    prompt = [1, 2, 3, *plain_greedy(model, [1, 2, 3], 14)]
    probs = exact_distribution(model, prompt, sampling)
    mx.random.seed(11)
    cache = make_prompt_cache(model)
    model(mx.array([prompt[:-1]], dtype=mx.uint32), cache=cache)
    counts: dict[tuple[int, ...], int] = {}
    stats = LookupStats()
    for _ in range(trials):
        steps = lookup_generate_step(
            mx.array(prompt[-1:], dtype=mx.uint32), model, cache=cache, context=prompt[:-1],
            num_tokens=3, max_tokens=DEPTH, sampling=sampling, stats=stats,
        )  # fmt: skip
        path = tuple(t for t, _, _ in steps)
        counts[path] = counts.get(path, 0) + 1
        trim_prompt_cache(cache, cache[0].offset - (len(prompt) - 1))
    assert stats.accepted > trials // 3 and stats.proposed - stats.accepted > trials // 3
    stat, df = chi2(counts, probs, trials)
    assert stat < chi2_critical(df), (stat, df)
    if sampling.top_k:
        return
    # mlx-lm's own sampler passes the same test: a check of the reference distribution.
    sampler = make_sampler(sampling.temp, top_p=sampling.top_p, top_k=sampling.top_k)
    plain: dict[tuple[int, ...], int] = {}
    for _ in range(trials // 3):
        steps = generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=DEPTH,
                              sampler=sampler)  # fmt: skip
        path = tuple(t for t, _ in steps)
        plain[path] = plain.get(path, 0) + 1
    stat, df = chi2(plain, probs, trials // 3)
    assert stat < chi2_critical(df), (stat, df)
