"""An lm-evaluation-harness model backend over our OpenELM: ``--model mlx-openelm``.

Apple scored OpenELM with lm-eval (``add_bos_token=True``, the Llama-2 tokenizer); this backend
answers lm-eval's three request types with the code ``mlx-openelm eval`` uses, so the numbers agree:

- ``loglikelihood``: requests sharing a context are scored together (``evaluate.pair_scores``):
  the context runs once into a KV cache and every continuation continues from a copy of it in one
  padded batch; a context too long for ``max_length`` loses tokens on the left, as in lm-eval.
  Contexts with a single continuation (WinoGrande, LAMBADA) run ``batch_size`` at a time.
- ``loglikelihood_rolling``: lm-eval's own rolling windows (``get_rolling_token_windows`` with BOS
  as the prefix token, so every token of the text is scored once, given BOS and up to
  ``max_length - 1`` tokens before it), windows of one length in batches of ``batch_size``.
- ``generate_until``: greedy ``mlx_openelm.generate`` with the request's stop strings.

Registered as ``mlx-openelm`` on import and through the ``lm_eval.models`` entry point. Build it
from Python with ``OpenELMLM(pretrained=FOLDER)`` or from an ``lm_eval`` model-args string
(``pretrained=FOLDER,adapter_path=DIR``; the batch size is lm-eval's ``--batch_size``). This
module needs ``lm-eval`` (the ``[eval]`` extra); ``python -m mlx_openelm.lm_eval_backend ARGS``
runs lm-eval's own command line with the backend registered (for lm-eval releases without
entry-point discovery).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from mlx_lm.models.cache import make_prompt_cache

from . import fastmath
from .errors import DataError
from .evaluate import _windows_nll, check_continuations, encode_pair, pair_scores
from .generate import generate, load_for_generation
from .tokenizer import MODEL_MAX_LENGTH

# (request kind, requests done, requests total, tokens scored or generated so far, seconds)
LMEvalProgress = Callable[[str, int, int, int, float], None]

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until requests that name none


def _as_bool(value: Any) -> bool:
    """lm-eval passes model args from the command line as strings (``"True"``)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class OpenELMLM(LM):
    """lm-eval's ``LM`` over an OpenELM folder (or hub id) loaded by mlx-openelm.

    Args:
        pretrained: model folder or hub repo id (converted once, like ``--model``).
        adapter_path: LoRA adapter folder to apply.
        tokenizer: explicit ``tokenizer.model`` file.
        batch_size: rows per forward pass (rolling windows, single-continuation contexts);
            the choices of one context always run together. lm-eval's ``auto``: the default.
        max_length: most tokens the model sees (OpenELM's context is 2048).
        max_gen_toks: generation cap when a request names none.
        on_progress: ``(kind, done, total, tokens, seconds)`` after each step; without it a tqdm
            bar (lm-eval's own progress display) is drawn on stderr.
        model, tokenizer_obj: an already loaded model and tokenizer (then ``pretrained`` is only
            a name).
        device, max_batch_size: accepted from lm-eval and ignored (MLX picks the device).
    """

    def __init__(
        self,
        pretrained: str = "apple/OpenELM-270M",
        adapter_path: str | None = None,
        tokenizer: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_length: int = MODEL_MAX_LENGTH,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        on_progress: LMEvalProgress | None = None,
        model: Any = None,
        tokenizer_obj: Any = None,
        device: str | None = None,
        max_batch_size: int | None = None,
        add_bos_token: bool | str = True,
    ) -> None:
        super().__init__()
        if not _as_bool(add_bos_token):
            raise DataError(
                "add_bos_token=False is not supported: OpenELM was trained and scored with BOS "
                "first (Apple evaluated with add_bos_token=True); drop the model arg"
            )
        if model is None:
            model, tokenizer_obj, _ = load_for_generation(
                pretrained, adapter_path=adapter_path, tokenizer=tokenizer
            )
        self.model, self.tok = model, tokenizer_obj
        self.name = str(pretrained)
        is_auto = batch_size is None or str(batch_size).startswith("auto")
        self.batch_size = DEFAULT_BATCH_SIZE if is_auto else int(batch_size)
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        if self.batch_size < 1 or self.max_length < 2:
            raise DataError(
                f"batch_size={batch_size} / max_length={max_length}: need batch_size >= 1 and "
                "max_length >= 2; fix the model args"
            )
        self.on_progress = on_progress

    # --- lm-eval's request types ----------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        groups: dict[str, list[int]] = {}  # context -> indices of its requests, in order
        for i, r in enumerate(requests):
            groups.setdefault(r.args[0], []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        report = self._reporter("loglikelihood", len(requests))
        singles = []  # (request, tokens, first target): contexts with one continuation
        for context, idx in groups.items():
            conts = [requests[i].args[1] for i in idx]
            if len(idx) == 1:
                singles.append((idx[0], *self._single(context, conts[0])))
                continue
            scores = pair_scores(self.model, self.tok, context, conts, self.max_length)
            for i, score in zip(idx, scores):
                results[i] = score
            report(len(idx), len(self.tok.encode(context, add_bos=True)))
        # e.g. WinoGrande: every context has one continuation, so batch them side by side.
        singles.sort(key=lambda s: (s[2], len(s[1])))  # similar contexts: little padding
        for b in range(0, len(singles), self.batch_size):
            batch = singles[b : b + self.batch_size]
            for (i, _, _), score in zip(batch, padded_scores(self.model, [s[1:] for s in batch])):
                results[i] = score
            report(len(batch), sum(len(t) for _, t, _ in batch))
        report.close()
        return results  # type: ignore[return-value]

    def _single(self, context: str, continuation: str) -> tuple[list[int], int]:
        """Tokens of one pair cut to ``max_length + 1`` on the left, and its first target."""
        ctx, cont = encode_pair(self.tok, context, continuation)
        check_continuations(context, [continuation], [cont], self.max_length)
        tokens = (ctx + cont)[-(self.max_length + 1) :]
        return tokens, len(tokens) - len(cont)

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        jobs: list[tuple[int, list[int], int]] = []  # (request, window tokens, first target)
        for i, r in enumerate(requests):
            ids = self.tok.encode(r.args[0], add_bos=False)
            windows = get_rolling_token_windows(ids, self.tok.bos_id, self.max_length, 1)
            for ctx, pred in map(make_disjoint_window, windows):
                jobs.append((i, ctx + pred, len(ctx)))
        totals = [0.0] * len(requests)
        by_length: dict[int, list[tuple[int, list[int], int]]] = {}
        for job in jobs:
            by_length.setdefault(len(job[1]), []).append(job)
        report = self._reporter("loglikelihood_rolling", len(jobs))
        for length, group in by_length.items():
            for b in range(0, len(group), self.batch_size):
                batch = group[b : b + self.batch_size]
                nll = _windows_nll(self.model, [w for _, w, _ in batch], [f for _, _, f in batch])
                for (i, _, _), x in zip(batch, nll):
                    totals[i] -= x
                report(len(batch), sum(length - f for _, _, f in batch))
        report.close()
        return totals

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        report = self._reporter("generate_until", len(requests))
        texts = []
        for r in requests:
            context, kwargs = r.args
            stops, max_tokens, sampling = self._generation_options(kwargs)
            # Like lm-eval's HF backend: keep the context's last tokens that leave room to generate.
            ids = self.tok.encode(context, add_bos=True)[-max(1, self.max_length - max_tokens) :]
            text = generate(self.model, self.tok, ids, max_tokens, stop=stops, **sampling)
            texts.append(text)
            report(1, len(self.tok.encode(text, add_bos=False)) if text else 0)
        report.close()
        return texts

    def _generation_options(self, kwargs: dict[str, Any]) -> tuple[list[str], int, dict]:
        until = kwargs.get("until") or []
        stops = [until] if isinstance(until, str) else list(until)
        max_tokens = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        temp = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        sampling: dict[str, Any] = {"temp": temp}
        if temp > 0 and "top_p" in kwargs:
            sampling["top_p"] = float(kwargs["top_p"])
        return stops, max_tokens, sampling

    # --- chat template (lm-eval's --apply_chat_template) ------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation rendered with the model's (Zephyr) template; BOS is added on encoding,
        as for every prompt (OpenELM-Instruct was fine-tuned on BOS + rendered text)."""
        return self.tok.apply_chat_template(chat_history, add_generation_prompt)

    # --- progress ---------------------------------------------------------------------------------

    def _reporter(self, kind: str, total: int) -> _Reporter:
        return _Reporter(kind, total, self.on_progress)


def padded_scores(model: Any, rows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of ``tokens[first:]`` for each ``(tokens, first)`` row.

    The rows run as one batch: first the prefix every row has (no padding there) into a KV
    cache, whose logits are never computed (MLX evaluates lazily and nothing reads them), then
    the rest right-padded (padding sits after every real token: causal attention never sees it).
    """
    longest = max(len(t) for t, _ in rows)
    tokens = mx.array([t + [0] * (longest - len(t)) for t, _ in rows])  # (B, longest)
    lo = min(f for _, f in rows) - 1  # positions before lo predict context tokens only
    cache = make_prompt_cache(model)
    if lo > 0:
        model(tokens[:, :lo], cache=cache)
    logits = model(tokens[:, lo:-1], cache=cache).astype(mx.float32)  # (B, longest-1-lo, V)
    logp = logits - fastmath.logsumexp(logits)[..., None]
    targets = tokens[:, lo + 1 :]  # position i predicts token i + 1
    picked = mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    pos = mx.arange(lo, longest - 1)[None]
    first = mx.array([f for _, f in rows])[:, None]
    end = mx.array([len(t) for t, _ in rows])[:, None]
    scored = (pos >= first - 1) & (pos < end - 1)
    hits = (mx.argmax(logits, axis=-1) == targets) | ~scored
    sums = (picked * scored).sum(axis=-1).tolist()
    return [(float(x), bool(g)) for x, g in zip(sums, hits.all(axis=-1).tolist())]


class _Reporter:
    """Counts requests and tokens for one request type; calls back or draws a tqdm bar."""

    def __init__(self, kind: str, total: int, callback: LMEvalProgress | None) -> None:
        self.kind, self.total, self.callback = kind, total, callback
        self.done = self.tokens = 0
        self.start = time.perf_counter()
        self.bar = None
        if callback is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"mlx-openelm {kind}", unit="req")

    def __call__(self, requests: int, tokens: int) -> None:
        self.done += requests
        self.tokens += tokens
        seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.update(requests)
            self.bar.set_postfix_str(f"{self.tokens / max(seconds, 1e-9):.0f} tok/s")
        else:
            self.callback(self.kind, self.done, self.total, self.tokens, seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main() -> None:
    """lm-eval's command line, with ``--model mlx-openelm`` registered."""
    from lm_eval.__main__ import cli_evaluate

    import mlx_openelm.lm_eval_backend  # noqa: F401 - registers the importable class

    cli_evaluate()


if __name__ == "__main__":
    main()  # `python -m`: this copy runs as __main__ and registers nothing (the import above does)
else:
    register_model("mlx-openelm")(OpenELMLM)
