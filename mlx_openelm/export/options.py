"""Export options that the CLI imports without loading MLX or the ``gguf`` package."""

from __future__ import annotations

from enum import Enum

from ..errors import ConfigError


class OutType(str, Enum):
    """The storage type of the 2-D weights in a GGUF (norms are always float32)."""

    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


def parse_outtype(value: str | OutType) -> OutType:
    """The :class:`OutType` for ``value``.

    Raises:
        ConfigError: not one of f32, f16, bf16, q8_0.
    """
    try:
        return OutType(value)
    except ValueError:
        choices = ", ".join(t.value for t in OutType)
        raise ConfigError(f"--outtype must be one of {choices}, got {value!r}") from None
