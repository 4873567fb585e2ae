"""Every fixed list of choices, once: a ``str`` Enum each, which Typer shows and the library checks.

Pure Python (no MLX), so the CLI can build its options from these without importing the
converter or the trainer. A member equals its value (``Bits("4") == "4"``); :func:`values` gives
the plain strings for checks and messages.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "Bits",
    "ChatTemplate",
    "CoreNetSize",
    "DType",
    "FineTuneType",
    "GroupSize",
    "LRSchedule",
    "MixedPreset",
    "OptimizerName",
    "QuantMethod",
    "RepetitionScope",
    "SourceFormat",
    "bit_widths",
    "values",
]


def values(choices: type[Enum]) -> tuple[str, ...]:
    """The values of an Enum's members, in order."""
    return tuple(m.value for m in choices)


class DType(str, Enum):
    """Weight dtype of a converted or fused model."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class SourceFormat(str, Enum):
    """Checkpoint formats ``convert`` reads."""

    hf = "hf"
    corenet = "corenet"
    gguf = "gguf"


class CoreNetSize(str, Enum):
    """Apple's released sizes (``mlx_openelm.config.PRESETS``' keys)."""

    s270M = "270M"
    s450M = "450M"
    s1_1B = "1_1B"
    s3B = "3B"


class Bits(str, Enum):
    """Bits per quantized weight (str for Typer; :func:`bit_widths` gives the ints)."""

    b2 = "2"
    b3 = "3"
    b4 = "4"
    b6 = "6"
    b8 = "8"


class GroupSize(str, Enum):
    """Weights per quantization scale."""

    g32 = "32"
    g64 = "64"
    g128 = "128"


class MixedPreset(str, Enum):
    """``mixed_L_H``: L bits for most weights, H bits for the sensitive ones."""

    mixed_2_6 = "mixed_2_6"
    mixed_3_4 = "mixed_3_4"
    mixed_3_6 = "mixed_3_6"
    mixed_4_6 = "mixed_4_6"

    @property
    def bits(self) -> tuple[int, int]:
        """``(low, high)`` bits, read from the name."""
        _, low, high = self.value.split("_")
        return int(low), int(high)


class QuantMethod(str, Enum):
    """How ``convert -q`` quantizes: round to nearest, or a learned method (``convert.learned``)."""

    rtn = "rtn"
    dwq = "dwq"
    gptq = "gptq"
    awq = "awq"
    dynamic = "dynamic"


class ChatTemplate(str, Enum):
    """The chat template a converted folder gets (auto: Zephyr for -Instruct models)."""

    auto = "auto"
    zephyr = "zephyr"
    none = "none"


class FineTuneType(str, Enum):
    lora = "lora"
    dora = "dora"
    full = "full"


class LRSchedule(str, Enum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class OptimizerName(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"


def bit_widths(choices: type[Bits] | type[GroupSize]) -> tuple[int, ...]:
    """The integer values of :class:`Bits` or :class:`GroupSize`."""
    return tuple(int(v) for v in values(choices))


class RepetitionScope(str, Enum):
    """Which tokens the repetition penalty counts."""

    context = "context"  # Hugging Face / Apple: every token of the prompt and the reply
    window = "window"  # mlx-lm: the last repetition_context_size tokens
