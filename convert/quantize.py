"""Quantizing tensor by tensor, with mlx-lm's config format and OpenELM-aware mixed presets.

Every ``nn.Linear`` and the (tied) ``nn.Embedding`` whose input width divides by the group size
is quantized with ``mx.quantize`` (affine) as its weight streams past; norms stay in the output
dtype. ``config.json`` gets mlx-lm's ``quantization`` entry — ``group_size``, ``bits``, ``mode``
plus a per-module entry for every module whose bits differ — so ``mlx_lm.load`` and
``mlx_openelm.load`` rebuild the same modules (``QuantizedLinear``; ``QuantizedEmbedding``, whose
``as_linear`` serves as the tied output head).

Mixed presets (``mixed_L_H``: L bits by default, H bits where it pays), after mlx-lm's recipes
(themselves after llama.cpp's Q4_K_M), in OpenELM's names:

- ``transformer.token_embeddings`` (also the output head, tied) and ``lm_head``: H bits;
- ``attn.qkv_proj`` (it holds the value projection) and ``ffn.proj_2`` (the down projection) of
  the first and last eighth of the layers and of every third layer in between: H bits;
- everything else (``out_proj``, ``proj_1``, the other ``qkv_proj``/``proj_2``): L bits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlx_openelm.choices import Bits, GroupSize, MixedPreset, bit_widths
from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import ConfigError
from mlx_openelm.model import Model

BITS = bit_widths(Bits)
GROUP_SIZES = bit_widths(GroupSize)
MIXED_PRESETS: dict[str, tuple[int, int]] = {m.value: m.bits for m in MixedPreset}
MODE = "affine"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True, kw_only=True)
class QuantPlan:
    """Which modules get quantized, and with how many bits.

    Attributes:
        group_size: elements sharing one scale and bias.
        bits: the default bit width (the low one for mixed presets).
        modules: module path -> bits, for every module that is quantized.
        mixed: the preset name, or None.
    """

    group_size: int
    bits: int
    modules: dict[str, int]
    mixed: str | None = None

    def config(self) -> dict[str, Any]:
        """The ``quantization`` entry of ``config.json`` (mlx-lm's format)."""
        out: dict[str, Any] = {"group_size": self.group_size, "bits": self.bits, "mode": MODE}
        for path, bits in self.modules.items():
            if bits != self.bits:
                out[path] = {"group_size": self.group_size, "bits": bits, "mode": MODE}
        return out

    def bits_per_weight(self, shapes: Mapping[str, tuple[int, ...]]) -> float:
        """Average stored bits per quantized weight, counting the float16 scale and bias."""
        total = weights = 0
        for path, bits in self.modules.items():
            n = 1
            for d in shapes[f"{path}.weight"]:
                n *= d
            total += n * bits + n // self.group_size * 32
            weights += n
        return total / max(weights, 1)


def check_quantization(bits: int, group_size: int, mixed: str | None = None) -> None:
    """Raise ConfigError for an unsupported bit width, group size or preset name."""
    if mixed is not None and mixed not in MIXED_PRESETS:
        choices = ", ".join(MIXED_PRESETS)
        raise ConfigError(f"unknown mixed preset {mixed!r}; choose one of {choices}")
    if bits not in BITS:
        raise ConfigError(f"--bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ConfigError(
            f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}"
        )


def plan_quantization(
    args: ModelArgs, bits: int = 4, group_size: int = 64, mixed: str | None = None
) -> QuantPlan:
    """Decide each module's bit width (see the module docstring for the mixed presets).

    Raises:
        ConfigError: an unsupported bit width, group size or preset name.
    """
    check_quantization(bits, group_size, mixed)
    low, high = MIXED_PRESETS[mixed] if mixed else (bits, bits)
    n = args.num_transformer_layers
    modules: dict[str, int] = {}
    for path, module in Model(args).named_modules():
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            continue  # norms, containers, and widths the group size does not divide stay float
        modules[path] = high if _wants_more_bits(path, n) else low
    return QuantPlan(
        group_size=group_size, bits=low, modules=dict(sorted(modules.items())), mixed=mixed
    )


def _wants_more_bits(path: str, num_layers: int) -> bool:
    if "token_embeddings" in path or path.startswith("lm_head"):
        return True
    m = _LAYER.search(path)
    if m is None or not path.endswith(("qkv_proj", "proj_2")):
        return False
    i, eighth = int(m.group(1)), num_layers // 8
    return i < eighth or i >= 7 * num_layers // 8 or (i - eighth) % 3 == 2


def quantize_stream(
    tensors: Iterable[tuple[str, mx.array]], plan: QuantPlan
) -> Iterator[tuple[str, mx.array]]:
    """Quantize planned weights as they stream past: ``w`` -> ``weight, scales, biases``."""
    for name, array in tensors:
        path = name.removesuffix(".weight")
        bits = plan.modules.get(path) if name.endswith(".weight") else None
        if bits is None:
            yield name, array
            continue
        wq, scales, biases = mx.quantize(array, group_size=plan.group_size, bits=bits, mode=MODE)
        yield name, wq
        yield f"{path}.scales", scales
        yield f"{path}.biases", biases
