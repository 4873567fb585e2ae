"""Learned quantization on OpenELM through mlx-lm's ``mlx_lm/quant/`` and its model protocol.

Round-to-nearest (``rtn``, ``convert.quantize``) streams tensor by tensor. The learned methods
need the float model in memory (float32) and calibration windows (``convert.calibration``):

- ``gptq``: our GPTQ (``convert.gptq``: mlx-lm's ``gptq_quantize`` rebuilt with clipped,
  float16-exact group grids and blocked updates; why there) on every linear layer and on the
  tied output head (as a linear layer over the final hidden states; the embedding lookup reuses
  its codes: mlx-lm would round it). :func:`pack_codes` packs any MLX width (MLX's layout is a
  plain LSB-first bit stream over each row), so 3 and 6 bits work too (mlx-lm packs 2, 4, 8).
- ``awq``: mlx-lm's ``awq_quantize`` with an OpenELM entry (:data:`OPENELM_AWQ`): activation-aware
  scales for ``qkv_proj`` (folded into ``attn_norm``) and ``proj_1`` (into ``ffn_norm``), and the
  clipping search on ``out_proj``, ``proj_1``, ``proj_2``. ``out_proj`` and ``proj_2`` are not
  rescaled: the op before them is a slice of a fused projection (the value rows of ``qkv_proj``,
  shared by several query heads under GQA; the ``up`` half of ``proj_1``), which mlx-lm's
  ``apply_scale`` cannot fold into.
- ``dwq``: mlx-lm's ``dwq_quantize`` — distils the float model into the quantized one, learning
  only the scales and biases (everything else frozen), KL loss at temperature 2; the quantized
  model it starts from is our GPTQ's.
- ``dynamic``: mlx-lm's ``estimate_sensitivities`` (the gradient of the KL to the float model
  along each layer's low-to-high quantization step), then the most sensitive layers per
  parameter get the higher width until ``bits_per_weight`` is reached.

Nothing is written here: the caller writes the folder atomically, so Ctrl-C leaves no output.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_openelm.choices import QuantMethod, values
from mlx_openelm.errors import ConfigError, OpenELMWarning
from mlx_openelm.model import Model

from .quantize import BITS, MODE, is_embedding

METHODS = values(QuantMethod)
DWQ_LEARNING_RATE = 1e-4
DWQ_EPOCHS = 2
BATCH_SIZE = 4

Quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def _openelm_awq() -> Any:
    from mlx_lm.quant.awq import AWQConfig, ScaleConfig

    return AWQConfig(
        embed="token_embeddings",
        lm_head="lm_head",
        no_clip=["qkv_proj"],  # q and k feed the attention scores (as mlx-lm's llama entry)
        scale_configs=[
            ScaleConfig(block="attn", prev="attn_norm", layers=["qkv_proj"], kwargs=["mask"]),
            ScaleConfig(block="ffn", prev="ffn_norm", layers=["proj_1"]),
        ],
    )


def pack_codes(w: mx.array, bits: int, scales: mx.array, biases: mx.array) -> mx.array:
    """Round ``w`` (out, in) onto the given affine grid and pack it as ``mx.quantize`` does."""
    n_bins = 2**bits - 1
    grouped = mx.unflatten(w, -1, (scales.shape[-1], -1))  # (out, groups, group_size)
    q = mx.round((grouped - biases[..., None]) / scales[..., None])
    q = mx.clip(q, 0, n_bins).astype(mx.uint32).flatten(-2, -1)  # (out, in)
    stream = (q[..., None] >> mx.arange(bits, dtype=mx.uint32)) & 1  # (out, in, bits)
    words = stream.reshape(q.shape[0], -1, 32)  # (out, in·bits/32, 32)
    return (words << mx.arange(32, dtype=mx.uint32)).sum(axis=-1).astype(mx.uint32)


def check_method(method: str, bits: int, bits_per_weight: float | None, group_size: int) -> None:
    """Raise ConfigError for an unknown method or a combination that cannot work."""
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "dynamic":
        if bits_per_weight is None:
            raise ConfigError("--method dynamic needs --bits-per-weight B (e.g. 4.5)")
        lowest = BITS[0] + 32 / group_size
        if bits_per_weight < lowest:
            raise ConfigError(
                f"--bits-per-weight {bits_per_weight} is below {lowest:g}, the size of "
                f"{BITS[0]}-bit weights with group size {group_size} (scales included)"
            )
    elif bits_per_weight is not None:
        raise ConfigError("--bits-per-weight applies to --method dynamic only")


def method_note(method: str, bits: int) -> str | None:
    """A warning for a method that rarely pays at this width (the run still goes ahead)."""
    if method == "dwq" and bits == 8:
        return "DWQ rarely helps at 8 bits (mlx-lm leaves 8-bit layers untrained); running anyway"
    return None


def learn_quantization(
    model: Model,
    method: str,
    data: mx.array,
    *,
    bits: int,
    group_size: int,
    quantize_embedding: bool = True,
    bits_per_weight: float | None = None,
    scale_dtype: mx.Dtype = mx.float16,
) -> Model:
    """Quantize the float ``model`` in place with a learned ``method`` and return it.

    Args:
        data: calibration windows, (samples, seq_len) token ids.
        quantize_embedding: False keeps the tied embedding / head in float.
        bits_per_weight: the budget of ``dynamic`` (scales and biases included).
        scale_dtype: the dtype the folder stores scales and biases in; GPTQ rounds on grids
            exact in it.
    """
    _check_widths(model, group_size)
    embedding = model.transformer.token_embeddings
    if method == "gptq":
        _gptq(model, data, bits, group_size, quantize_embedding, scale_dtype)
    elif method == "awq":
        from mlx_lm.quant.awq import awq_quantize

        view = _AWQView(model)
        awq_quantize(view, data, _openelm_awq(), group_size, bits, group_size, bits)
        _strip_features(model)
    elif method == "dwq":
        _dwq(model, data, bits, group_size, quantize_embedding, scale_dtype)
    elif method == "dynamic":
        _dynamic(model, data, group_size, bits_per_weight, quantize_embedding)
    else:
        raise ConfigError(f"--method {method} is not a learned method")
    if not quantize_embedding:
        model.transformer.token_embeddings = embedding
    model.eval()
    return model


def _check_widths(model: Model, group_size: int) -> None:
    odd = [
        f"{p} ({m.weight.shape[-1]})"
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size
    ]
    if odd:
        raise ConfigError(
            f"group size {group_size} does not divide the input width of {', '.join(odd[:4])}"
            f"{' …' if len(odd) > 4 else ''}; learned methods quantize every layer: pass a "
            "smaller --group-size, or --method rtn (which keeps those layers float)"
        )


class _HeadView(nn.Module):
    """The model with its tied output head as a plain ``nn.Linear`` (sharing the embedding's
    matrix), so mlx-lm's GPTQ quantizes the head from the Hessian of its own inputs (the final
    hidden states) like any other linear layer; the embedding then reuses those codes."""

    def __init__(self, model: Model):
        super().__init__()
        self.transformer = model.transformer
        emb = model.transformer.token_embeddings
        self.head = nn.Linear(emb.weight.shape[1], emb.weight.shape[0], bias=False)
        self.head.weight = emb.weight

    def __call__(self, ids: mx.array) -> mx.array:
        return self.head(self.transformer(ids))


def _gptq(
    model: Model,
    data: mx.array,
    bits: int,
    group_size: int,
    quantize_embedding: bool = True,
    scale_dtype: mx.Dtype = mx.float16,
) -> None:
    """Our GPTQ (``convert.gptq``) on every linear layer and, tied, on the output head."""
    from tqdm import tqdm

    from .gptq import collect_hessians, gptq_weight

    tied = model.args.share_input_output_layers and quantize_embedding
    target = _HeadView(model) if tied else model
    batches = -(-data.shape[0] // BATCH_SIZE)
    with tqdm(total=batches, desc="GPTQ Hessians", leave=False) as bar:
        hessians = collect_hessians(target, data, BATCH_SIZE, on_batch=bar.update)
    swaps = []
    for path, (linear, H) in tqdm(hessians.items(), desc="GPTQ layers", leave=False):
        if not quantize_embedding and is_embedding(path):
            continue
        w, scales, biases = gptq_weight(linear.weight, H, bits, group_size, scale_dtype)
        q = nn.QuantizedLinear(*linear.weight.shape[::-1], bias="bias" in linear,
                               group_size=group_size, bits=bits)  # fmt: skip
        q.weight, q.scales, q.biases = pack_codes(w, bits, scales, biases), scales, biases
        if "bias" in linear:
            q.bias = linear.bias
        swaps.append((path, q))
    target.update_modules(tree_unflatten(swaps))
    if tied:  # the embedding lookup reuses the head's codes
        head = target.head
        emb = nn.QuantizedEmbedding(head.weight.shape[0], head.weight.shape[1] * 32 // bits,
                                    group_size=group_size, bits=bits)  # fmt: skip
        emb.weight, emb.scales, emb.biases = head.weight, head.scales, head.biases
        model.transformer.token_embeddings = emb
    elif quantize_embedding:  # an untied embedding has no Hessian of its own: round to nearest
        nn.quantize(model, group_size=group_size, bits=bits,
                    class_predicate=lambda p, m: isinstance(m, nn.Embedding))  # fmt: skip


class _AWQView(nn.Module):
    """mlx-lm's AWQ reads ``model.model.<embed>``, ``model.layers`` and ``model.lm_head``."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model.transformer
        self.layers = model.transformer.layers
        if "lm_head" in model:
            self.lm_head = model.lm_head


def _strip_features(model: Model) -> None:
    """Drop the ``input_feat`` activations AWQ's catcher left on the modules."""
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        m.pop("input_feat", None)


def _dwq(
    model: Model,
    data: mx.array,
    bits: int,
    group_size: int,
    quantize_embedding: bool = True,
    scale_dtype: mx.Dtype = mx.float16,
) -> None:
    """mlx-lm's DWQ, started from our GPTQ result (mlx-lm's DWQ starts from any quantized
    model; from GPTQ it ends lower than from round-to-nearest: RESULTS.md, *Quantization*)."""
    import copy

    import mlx.optimizers as optim
    from mlx_lm.quant.dwq import dwq_quantize

    teacher = copy.deepcopy(model)
    teacher.freeze()
    _gptq(model, data, bits, group_size, quantize_embedding, scale_dtype)
    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    if on_cpu:  # MLX's quantized matmul (and its gradient) is ~50x slower there than BLAS
        _swap(model, {nn.QuantizedLinear: _DequantLinear, nn.QuantizedEmbedding: _DequantEmbedding})
    model.freeze()  # dwq_quantize unfreezes the scales and biases only
    rows = [(row, 0) for row in data.tolist()]  # (tokens, prompt offset)
    valid, train = rows[-BATCH_SIZE:], rows[:-BATCH_SIZE] * DWQ_EPOCHS
    start = [(m, m.scales, m.biases) for m in _grids(model)]
    held_out = data[-BATCH_SIZE:]
    before = _kl_to(teacher, model, held_out)
    dwq_quantize(
        model,
        lambda batch, i, split: mx.stop_gradient(teacher(batch)),
        optim.Adam(learning_rate=DWQ_LEARNING_RATE, bias_correction=True),
        train,
        valid,
        batch_size=BATCH_SIZE,
        max_seq_length=data.shape[1],
        seed=0,
        dtype=mx.float32,
    )
    model.eval()
    after = _kl_to(teacher, model, held_out)
    if not after <= before:  # distillation made it worse (or NaN): keep the GPTQ start
        for m, scales, biases in start:
            m.scales, m.biases = scales, biases
        warnings.warn(
            f"DWQ raised the held-out KL to the float model from {before:.4g} to {after:.4g}; "
            "kept its GPTQ start (more --calibration-samples usually helps)",
            OpenELMWarning,
            stacklevel=2,
        )
    if on_cpu:
        _swap(model, {_DequantLinear: nn.QuantizedLinear, _DequantEmbedding: nn.QuantizedEmbedding})


def _grids(model: nn.Module) -> list[nn.Module]:
    """The modules holding quantization scales and biases."""
    modules = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return [m for _, m in modules if "scales" in m]


def _kl_to(teacher: nn.Module, student: nn.Module, ids: mx.array) -> float:
    """Mean KL(teacher ‖ student) per token of the next-token distributions on ``ids``."""
    p = nn.log_softmax(teacher(ids).astype(mx.float32), axis=-1)
    q = nn.log_softmax(student(ids).astype(mx.float32), axis=-1)
    return (mx.exp(p) * (p - q)).sum(-1).mean().item()


class _DequantLinear(nn.Module):
    """A quantized linear layer computed as ``x @ dequantize(w).T``: float32 BLAS on a CPU, and
    ``mx.dequantize`` passes gradients to the scales and biases DWQ learns."""

    def __init__(self, q: nn.Module):
        super().__init__()
        self.weight, self.scales, self.biases = q.weight, q.scales, q.biases
        self.group_size, self.bits, self.mode = q.group_size, q.bits, q.mode

    def dense(self) -> mx.array:
        return mx.dequantize(
            self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits
        )  # (out, in)

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.dense().T


class _DequantEmbedding(_DequantLinear):
    def __call__(self, ids: mx.array) -> mx.array:
        return mx.dequantize(
            self.weight[ids], self.scales[ids], self.biases[ids], self.group_size, self.bits
        )  # (..., dim)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.dense().T


def _swap(model: nn.Module, kinds: dict[type, type]) -> None:
    """Rebuild every module of a key type as its value type, keeping the same arrays."""
    swaps = []
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        target = kinds.get(type(m))
        if target is None:
            continue
        if target in (nn.QuantizedLinear, nn.QuantizedEmbedding):
            out_dim, packed = m.weight.shape
            dims = (packed * 32 // m.bits, out_dim)
            if target is nn.QuantizedLinear:
                new = target(*dims, bias=False, group_size=m.group_size, bits=m.bits)
            else:
                new = target(out_dim, dims[0], group_size=m.group_size, bits=m.bits)
            new.weight, new.scales, new.biases = m.weight, m.scales, m.biases
        else:
            new = target(m)
        swaps.append((path, new))
    model.update_modules(tree_unflatten(swaps))


def _quantizable(path: str, module: nn.Module) -> bool:
    return hasattr(module, "to_quantized")


def _dynamic(
    model: Model, data: mx.array, group_size: int, budget: float, quantize_embedding: bool
) -> None:
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities

    low, high = _levels(budget, group_size)
    widths = {path: low for path in _quantizable_paths(model, quantize_embedding)}
    if high is not None:
        found = estimate_sensitivities(
            model, data, low, group_size, high, group_size, batch_size=BATCH_SIZE
        )
        widths = allocate_bits(dict(found), _sizes(model), widths, high, group_size, budget)
    nn.quantize(
        model,
        group_size=group_size,
        bits=low,
        class_predicate=lambda p, m: p in widths and {"bits": widths[p], "group_size": group_size},
    )


def _levels(budget: float, group_size: int) -> tuple[int, int | None]:
    """The widths to mix for ``budget``: the widest below it and the narrowest above it.

    On a width's own size (4.5 = 4-bit g64) the neighbours are mixed (3 and 6 bits), so the
    sensitivity decides where the bits go; at the narrowest (2.5) there is nothing below.
    """
    size = {b: b + 32 / group_size for b in BITS}
    below = [b for b in BITS if size[b] < budget - 1e-9]
    above = [b for b in BITS if size[b] > budget + 1e-9]
    if not below:
        return BITS[0], None
    return below[-1], (above[0] if above else None)


def _quantizable_paths(model: Model, quantize_embedding: bool) -> list[str]:
    return [
        p
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if hasattr(m, "to_quantized") and (quantize_embedding or not is_embedding(p))
    ]


def _sizes(model: Model) -> dict[str, int]:
    return {
        p: m.weight.size
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if hasattr(m, "to_quantized")
    }


def allocate_bits(
    sensitivity: dict[str, float],
    sizes: dict[str, int],
    widths: dict[str, int],
    high: int,
    group_size: int,
    budget: float,
) -> dict[str, int]:
    """Raise the most sensitive layers (per parameter) to ``high`` bits while the average fits."""
    out = dict(widths)
    total = sum(sizes[p] for p in out)
    spent = sum(sizes[p] * (b + 32 / group_size) for p, b in out.items())
    for path in sorted(out, key=lambda p: -sensitivity.get(p, 0.0)):
        extra = sizes[path] * (high - out[path])
        if (spent + extra) / total <= budget + 1e-9:
            out[path], spent = high, spent + extra
    return out


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """mlx-lm's ``quantization`` entry for a quantized model: defaults plus per-module widths."""
    layers = [
        (p, m)
        for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, Quantized)
    ]
    counts: dict[tuple[int, int], int] = {}
    for _, m in layers:
        counts[(m.bits, m.group_size)] = counts.get((m.bits, m.group_size), 0) + m.weight.size
    bits, group_size = max(counts, key=counts.get)
    config: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": MODE}
    for path, m in layers:
        if (m.bits, m.group_size) != (bits, group_size):
            config[path] = {"group_size": m.group_size, "bits": m.bits, "mode": MODE}
    return config


def model_bits_per_weight(model: nn.Module) -> float:
    """Average stored bits per quantized weight, float16 scale and bias included."""
    total = weights = 0
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, Quantized):
            n = m.weight.size * 32 // m.bits
            total += n * m.bits + n // m.group_size * 32
            weights += n
    return total / max(weights, 1)


def model_tensors(model: nn.Module, dtype: mx.Dtype) -> Iterator[tuple[str, mx.array]]:
    """The model's tensors for the folder writer: floats cast to ``dtype``, packed codes as-is."""
    for name, value in tree_flatten(model.parameters()):
        yield name, value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
