"""What quantizing cost: the quantized model against the unquantized weights on a fixed text.

The reference runs layer by layer from the source tensors (rounded to the output dtype, computed
in float32), so at most one float layer is in memory besides the embedding; the quantized model
is the written folder itself, loaded lazily with its float parts in float32 too, so the numbers
measure quantization alone. Reported: the mean (and worst) KL divergence between the two models'
next-token distributions, both perplexities and how often their top-1 tokens agree.

The text is the user's ``--calibration FILE`` (its first :data:`PROBE_TOKENS` tokens), else
:data:`PROBE_TEXT`. NaN or infinite logits (float16 overflow: why 3B defaults to bfloat16) are
an error, not a number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import DataError, QuantizationError
from mlx_openelm.loading import load_model
from mlx_openelm.model import TransformerBlock
from mlx_openelm.tokenizer import Tokenizer

from .calibration import calibration_ids
from .tensors import TensorRef

PROBE_TOKENS = 256
# A fixed, plain English probe (written for this tool): prose, a list, numbers and a little code.
PROBE_TEXT = (
    "The lighthouse keeper climbed the narrow stairs every evening at sunset. From the top he "
    "could see the fishing boats coming home, the gulls circling above the harbour and, on clear "
    "days, the hills on the far side of the bay. He wrote the weather in a small notebook: wind "
    "from the west, light rain in the morning, a calm sea by noon. Over forty years the notebook "
    "became a record of the coast that scientists later used to study how storms had changed.\n"
    "To make bread you need four things: flour, water, salt and yeast. Mix them, let the dough "
    "rest for an hour, fold it, shape it and bake it in a hot oven for about thirty-five "
    "minutes. The crust should sound hollow when you tap it.\n"
    "In 1969 the first people walked on the Moon; the trip took about three days each way. "
    "Today a small computer in a phone is many thousands of times faster than the one that "
    "guided that mission.\n"
    "def mean(values):\n    return sum(values) / len(values)\n"
    "Question: What is the capital of France? Answer: Paris is the capital and largest city of "
    "France, on the river Seine."
)


@dataclass(frozen=True, kw_only=True)
class QualityReport:
    """Quantized vs unquantized on a probe text.

    Attributes:
        tokens: probe length in tokens.
        kl_mean: mean KL(unquantized || quantized) of next-token distributions, in nats.
        kl_max: the largest per-position KL.
        ppl_reference: perplexity of the unquantized weights on the probe.
        ppl_quantized: perplexity of the quantized model on the probe.
        top1_agreement: fraction of positions where both predict the same next token.
    """

    tokens: int
    kl_mean: float
    kl_max: float
    ppl_reference: float
    ppl_quantized: float
    top1_agreement: float
    text: str = "built-in English passage"

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change (0.01 = +1%)."""
        return self.ppl_quantized / self.ppl_reference - 1


def quantization_quality(
    reference: Mapping[str, TensorRef],
    folder: Path,
    args: ModelArgs,
    dtype: mx.Dtype,
    max_tokens: int = PROBE_TOKENS,
    calibration: str | Path | None = None,
) -> QualityReport:
    """Compare the quantized folder with the unquantized ``reference`` tensors (our names).

    Raises:
        QuantizationError: either model's logits are NaN or infinite.
        DataError: the calibration file is unreadable or too short (fewer than 16 tokens).
    """
    tokenizer = Tokenizer.from_folder(folder)
    if calibration is None:
        ids = [i for i in tokenizer.encode(PROBE_TEXT) if i < args.vocab_size]
    else:
        ids = calibration_ids(calibration, tokenizer, args.vocab_size, max_tokens)
        if len(ids) < 16:
            raise DataError(f"calibration file {calibration} holds {len(ids)} tokens; the "
                            "quality probe needs at least 16: use a longer file")  # fmt: skip
    ids = ids[:max_tokens]
    tokens = mx.array(ids)[None]  # (1, L)
    ref_logits = _reference_logits(reference, args, dtype, tokens)
    _check_finite(ref_logits, f"the unquantized {dtype} weights", dtype)
    model, _ = load_model(folder, lazy=True)
    model.set_dtype(mx.float32)  # scales, biases and norms (packed weights, if kept, stay packed)
    q_logits = model(tokens)[0].astype(mx.float32)
    _check_finite(q_logits, "the quantized model", dtype)
    text = "built-in English passage" if calibration is None else str(calibration)
    return replace(_compare(ref_logits, q_logits, ids), text=text)


def _check_finite(logits: mx.array, who: str, dtype: mx.Dtype) -> None:
    bad = mx.logical_not(mx.isfinite(logits)).any(axis=-1)  # (L,)
    if bad.any().item():
        first = int(mx.argmax(bad).item())
        raise QuantizationError(
            f"quality probe: the logits of {who} hold NaN or infinity (first at token {first}), "
            f"so the cost means nothing and no folder was written; the weights overflow {dtype} "
            "or are damaged: convert with --dtype bfloat16 or float32, or pass --no-quality"
        )


def _reference_logits(
    reference: Mapping[str, TensorRef], args: ModelArgs, dtype: mx.Dtype, tokens: mx.array
) -> mx.array:
    def load(module: nn.Module, prefix: str) -> nn.Module:
        weights = [
            (k[len(prefix) :], ref.to_mlx(dtype).astype(mx.float32))
            for k, ref in reference.items()
            if k.startswith(prefix)
        ]
        return module.load_weights(weights, strict=True)

    embedding = load(nn.Embedding(args.vocab_size, args.model_dim), "transformer.token_embeddings.")
    h = embedding(tokens)  # (1, L, dim)
    mask = create_attention_mask(h)
    for i in range(args.num_transformer_layers):
        block = load(TransformerBlock(args, i), f"transformer.layers.{i}.")
        h = block(h, mask)
        mx.eval(h)  # so this layer's weights can be freed before the next is read
        del block
    h = load(nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps), "transformer.norm.")(h)
    if args.share_input_output_layers:
        logits = embedding.as_linear(h)
    else:
        logits = load(nn.Linear(args.model_dim, args.vocab_size, bias=False), "lm_head.")(h)
    return logits[0]  # (L, vocab)


def _compare(ref: mx.array, quant: mx.array, ids: list[int]) -> QualityReport:
    log_p = ref - mx.logsumexp(ref, axis=-1, keepdims=True)  # (L, vocab)
    log_q = quant - mx.logsumexp(quant, axis=-1, keepdims=True)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)  # (L,)
    targets = mx.array(ids[1:])[:, None]
    nll_p = -mx.take_along_axis(log_p[:-1], targets, axis=-1).mean()
    nll_q = -mx.take_along_axis(log_q[:-1], targets, axis=-1).mean()
    agree = (ref.argmax(axis=-1) == quant.argmax(axis=-1)).astype(mx.float32).mean()
    return QualityReport(
        tokens=len(ids),
        kl_mean=kl.mean().item(),
        kl_max=kl.max().item(),
        ppl_reference=mx.exp(nll_p).item(),
        ppl_quantized=mx.exp(nll_q).item(),
        top1_agreement=agree.item(),
    )
