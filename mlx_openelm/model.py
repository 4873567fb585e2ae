"""OpenELM in MLX, following mlx-lm's model protocol.

Decoder-only transformer with pre-norm RMSNorm, a fused QKV projection, per-head RMSNorm on q and k,
rotate-half RoPE, grouped-query attention, a SwiGLU FFN (``proj_1`` → [gate | up]) and tied
input/output embeddings. Every layer has its own head count and FFN width (layer-wise scaling).

Each norm, the rotary embedding and the attention run as one fused MLX kernel
(``mx.fast.rms_norm`` via ``nn.RMSNorm``, ``mx.fast.rope``,
``mx.fast.scaled_dot_product_attention``): the OpenELM paper found
an unfused RMSNorm (113 of them in 1_1B) dominated its inference time. On MLX's CPU backend, whose
``exp`` is slow, float32 attention over several queries and the SwiGLU gate use ``fastmath``'s
polynomial exp instead (same numbers to ~1e-7; see that module).

Parameter names match Apple's Hugging Face checkpoints (``transformer.layers.N.attn.qkv_proj`` …),
which is also what ``mlx_lm.models.openelm`` expects, so a folder loads in either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from . import fastmath
from .config import ModelArgs

__all__ = ["ACTIVATIONS", "Model", "ModelArgs"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + mx.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def _gelu_erf(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + mx.erf(x / math.sqrt(2.0)))


# transformers' ACT2FN, which Apple's code indexes with ``activation_fn_name``, formula for formula.
ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "swish": fastmath.silu,
    "silu": fastmath.silu,
    "gelu": _gelu_erf,
    "gelu_python": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + mx.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_10": lambda x: mx.clip(_gelu_erf(x), -10.0, 10.0),
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
    "relu": nn.relu,
    "relu2": lambda x: mx.square(nn.relu(x)),
    "relu6": lambda x: mx.clip(x, 0.0, 6.0),
    "leaky_relu": lambda x: mx.where(x >= 0, x, 0.01 * x),
    "sigmoid": mx.sigmoid,
    "tanh": mx.tanh,
    "mish": lambda x: x * mx.tanh(nn.softplus(x)),
    "laplace": lambda x: 0.5 * (1.0 + mx.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
    "linear": lambda x: x,
}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_q = args.num_query_heads[layer]
        self.n_kv = args.num_kv_heads[layer]
        self.head_dim = hd = args.head_dim
        self.rope_base = args.rope_freq_constant
        self.scale = hd**-0.5
        self.qkv_proj = nn.Linear(args.model_dim, (self.n_q + 2 * self.n_kv) * hd, bias=False)
        self.out_proj = nn.Linear(self.n_q * hd, args.model_dim, bias=False)
        self.normalize_qk = args.normalize_qk_projections
        if self.normalize_qk:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)

    def _rope(self, x: mx.array, offset: int) -> mx.array:
        # Rotate-half ("non-traditional") RoPE, as in Apple's PyTorch code.
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset
        )

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, self.n_q + 2 * self.n_kv, self.head_dim)
        qkv = qkv.transpose(0, 2, 1, 3)  # (B, n_q + 2·n_kv, L, hd)
        q, k, v = mx.split(qkv, [self.n_q, self.n_q + self.n_kv], axis=1)
        # q: (B, n_q, L, hd); k, v: (B, n_kv, L, hd)
        if self.normalize_qk:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = cache.offset if cache is not None else 0
        q, k = self._rope(q, offset), self._rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, n_kv, offset + L, hd)
        # GQA without repeating k/v: n_q / n_kv query heads share each kv head.
        if not hasattr(cache, "bits"):  # the fused kernel, or on the CPU a faster exp (fastmath)
            out = fastmath.attention(q, k, v, self.scale, mask)
        else:  # mlx-lm's helper handles quantized KV caches
            out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, self.n_q * self.head_dim)  # (B, L, n_q·hd)
        return self.out_proj(out)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        hidden = args.ffn_dims[layer]
        self.glu = args.ffn_with_glu
        self.swish = args.activation_fn_name in ("swish", "silu")
        self._act = ACTIVATIONS[args.activation_fn_name]
        self.proj_1 = nn.Linear(args.model_dim, (2 if self.glu else 1) * hidden, bias=False)
        self.proj_2 = nn.Linear(hidden, args.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.proj_1(x)  # (B, L, 2·hidden): [gate | up], or (B, L, hidden) without GLU
        if not self.glu:
            return self.proj_2(self._act(h))
        gate, up = mx.split(h, 2, axis=-1)  # (B, L, hidden) each
        if self.swish:
            return self.proj_2(fastmath.swiglu(gate, up))  # silu(gate)·up, one compiled kernel
        return self.proj_2(self._act(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.attn = Attention(args, layer)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.ffn = MLP(args, layer)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))


class OpenELMModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_transformer_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: Any = None, mask: Any = None) -> mx.array:
        h = self.token_embeddings(inputs)  # (B, L, dim)
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None:
            mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)
        return self.norm(h)


class Model(nn.Module):
    """OpenELM causal LM: ``model(tokens (B, L), cache=None) -> logits (B, L, vocab)``.

    ``mask`` may be given explicitly (e.g. a block-diagonal causal mask for packed training
    sequences, shape broadcastable to (B, n_heads, L, L), boolean or additive).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.transformer = OpenELMModel(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Any = None, mask: Any = None) -> mx.array:
        h = self.transformer(inputs, cache, mask)
        if self.args.share_input_output_layers:
            return self.transformer.token_embeddings.as_linear(h)  # (B, L, vocab)
        return self.lm_head(h)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.transformer.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop tensors that tied embeddings make redundant (``lm_head`` in some exports)."""
        if self.args.share_input_output_layers:
            return {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return dict(weights)
