"""How a quantized folder runs: quantized kernels, or dequantized to float32 at load on a CPU.

MLX's CPU kernels for quantized (and half-precision) matmuls are far slower than its float32
BLAS path (4-bit 270M decoded at 0.6 tokens/s against 6 for float32 here, ``benchmarks/
RESULTS.md``). So on the CPU backend a quantized folder is dequantized once at load, when the
float32 weights fit in memory: every ``QuantizedLinear``/``QuantizedEmbedding`` becomes the plain
module holding ``mx.dequantize`` of its packed weight — the very values the quantized kernel
multiplies by — so outputs match the quantized kernels up to float rounding, at float32 speed.
The folder on disk stays quantized. ``MLX_OPENELM_QUANTIZED_KERNELS=1`` (or
``load(..., dequantize=False)``) keeps the quantized kernels; on a GPU they are kept anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

KEEP_ENV = "MLX_OPENELM_QUANTIZED_KERNELS"
# Dequantize only when the float32 weights take at most this share of the available memory.
MEMORY_SHARE = 0.6


@dataclass(frozen=True, kw_only=True)
class Execution:
    """What a loaded model multiplies with.

    Attributes:
        quantization: a short description of the folder's quantization (``4-bit g64``,
            ``mixed 3/6-bit g64``...), or None for a float folder.
        dequantized: the quantized weights were expanded to float32 at load.
        reason: why (``CPU``, or why not: ``GPU``, ``MLX_OPENELM_QUANTIZED_KERNELS=1``...).
    """

    quantization: str | None
    dequantized: bool = False
    reason: str = ""

    def describe(self) -> str:
        """One phrase for the stats line and ``info``."""
        if self.quantization is None:
            return "float weights"
        if self.dequantized:
            return f"{self.quantization}, dequantized to float32 at load ({self.reason})"
        return f"{self.quantization}, quantized kernels ({self.reason})"


def describe_quantization(quantization: dict[str, Any] | None) -> str | None:
    """``4-bit g64`` or ``mixed 3/6-bit g64`` from mlx-lm's ``quantization`` config entry."""
    if not quantization:
        return None
    bits = {quantization.get("bits", 4)} | {
        v["bits"] for v in quantization.values() if isinstance(v, dict) and "bits" in v
    }
    kind = (
        f"{bits.pop()}-bit" if len(bits) == 1 else f"mixed {'/'.join(map(str, sorted(bits)))}-bit"
    )
    return f"{kind} g{quantization.get('group_size', 64)}"


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def plan_execution(
    quantization: dict[str, Any] | None, float32_bytes: int, dequantize: bool | None = None
) -> Execution:
    """Decide whether a quantized model should be dequantized at load.

    Args:
        quantization: the folder's ``quantization`` entry (None: a float folder).
        float32_bytes: what the model's weights take in float32.
        dequantize: True or False forces the choice; None decides: on the CPU backend, unless
            ``MLX_OPENELM_QUANTIZED_KERNELS=1``, when ``float32_bytes`` fits in free memory.
    """
    what = describe_quantization(quantization)
    if what is None:
        return Execution(quantization=None)
    if dequantize is not None:
        return Execution(quantization=what, dequantized=dequantize, reason="asked for")
    if os.environ.get(KEEP_ENV, "") not in ("", "0"):
        return Execution(quantization=what, reason=f"{KEEP_ENV}=1")
    if mx.default_device().type != mx.DeviceType.cpu:
        return Execution(quantization=what, reason="GPU")
    free = available_memory()
    if free is not None and float32_bytes > MEMORY_SHARE * free:
        gb = float32_bytes / 1e9
        reason = f"float32 needs {gb:.1f} GB, {free / 1e9:.1f} GB free"
        return Execution(quantization=what, reason=reason)
    return Execution(quantization=what, dequantized=True, reason="CPU")


def float32_bytes(model: nn.Module) -> int:
    """Bytes the model's weights would take with every quantized module expanded to float32."""
    total = 0
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            out_dim, packed = m.weight.shape
            total += 4 * out_dim * packed * 32 // m.bits
            total += 4 * (m["bias"].size if "bias" in m else 0)
        else:
            total += sum(4 * v.size for _, v in tree_flatten(m.parameters()))
    return total


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized module by its float32 twin (same values), all floats in float32."""

    def expand(m: nn.Module) -> nn.Module:
        w = mx.dequantize(
            m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits, mode=m.mode
        ).astype(mx.float32)  # (out, in)
        if isinstance(m, nn.QuantizedEmbedding):
            float_module = nn.Embedding(*w.shape)
        else:
            float_module = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                float_module.bias = m.bias
        float_module.weight = w
        return float_module

    swaps = [
        (path, expand(m))
        for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    ]
    if swaps:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(swaps))
    model.set_dtype(mx.float32)
    return model
