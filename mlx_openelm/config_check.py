"""Type and range checks of every ``config.json`` field, before any size is used.

A config is user input: a string where a number belongs, ``"false"`` (truthy) for a boolean, a
NaN multiplier, ``num_gqa_groups: 0`` (a division by zero) or a million layers (hours of module
building) must each be one ``ConfigError`` naming the field, not a traceback or a hang.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, short

if TYPE_CHECKING:
    from .config import ModelArgs

_MAX_SIZE = 2**31 - 1
# Apple's largest OpenELM has 36 layers; far beyond that is a typo or a hostile file.
MAX_LAYERS = 512
_POSITIVE_INTS = {
    "num_transformer_layers": MAX_LAYERS,
    "model_dim": 2**20,
    "head_dim": 2**16,
    "vocab_size": 2**24,
    "num_gqa_groups": 2**16,
    "ffn_dim_divisor": 2**20,
    "rope_max_length": _MAX_SIZE,
    "max_context_length": _MAX_SIZE,
}
_BOOLS = ("ffn_with_glu", "normalize_qk_projections", "share_input_output_layers")
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_freq_constant")
_MULTIPLIERS = ("qkv_multipliers", "ffn_multipliers")
_MAX_MULTIPLIER = 1000.0  # OpenELM's are at most 4 (FFN) and 1 (QKV)
_QUANT_BITS = (2, 3, 4, 5, 6, 8)
_QUANT_GROUPS = (32, 64, 128)


def _fail(name: str, want: str, value: Any) -> ConfigError:
    return ConfigError(
        f"config field '{name}' must be {want}, got {short(repr(value), 80)}; fix config.json "
        "(or re-convert the checkpoint)"
    )


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise _fail(name, f"an integer in [{low}, {high}]", value)


def _check_number(name: str, value: Any, high: float = math.inf) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= high:
        raise _fail(
            name, "a finite positive number" + (f" up to {high}" if high < math.inf else ""), value
        )


def _check_multipliers(name: str, value: Any) -> None:
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LAYERS:
            raise _fail(name, f"at most {MAX_LAYERS} values", f"{len(value)} values")
        for i, v in enumerate(value):
            _check_number(f"{name}[{i}]", v, _MAX_MULTIPLIER)
    elif value is not None:
        _check_number(name, value, _MAX_MULTIPLIER)


def _check_quant_entry(name: str, entry: dict[str, Any]) -> None:
    if "bits" in entry and (type(entry["bits"]) is not int or entry["bits"] not in _QUANT_BITS):
        raise _fail(f"{name}.bits", f"one of {', '.join(map(str, _QUANT_BITS))}", entry["bits"])
    group = entry.get("group_size")
    if "group_size" in entry and (type(group) is not int or group not in _QUANT_GROUPS):
        raise _fail(f"{name}.group_size", "one of 32, 64, 128", group)
    if "mode" in entry and not isinstance(entry["mode"], str):
        raise _fail(f"{name}.mode", "a string", entry["mode"])


def check_quantization(value: Any) -> None:
    """mlx-lm's ``quantization`` entry: defaults plus per-module dicts or ``false``."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise _fail("quantization", 'an object like {"group_size": 64, "bits": 4}', value)
    _check_quant_entry("quantization", value)
    for key, entry in value.items():
        if isinstance(entry, dict):
            _check_quant_entry(f"quantization.{key}", entry)
        elif key not in ("group_size", "bits", "mode", "quant_method") and entry is not False:
            raise _fail(f"quantization.{key}", "an object or false", entry)


def check_fields(args: ModelArgs) -> None:
    """Check every field's type and range, before any is used in arithmetic.

    Raises:
        ConfigError: naming the first bad field, what it must be and what it is.
    """
    for name, high in _POSITIVE_INTS.items():
        _check_int(name, getattr(args, name), 1, high)
    for name in ("bos_token_id", "eos_token_id"):
        _check_int(name, getattr(args, name), 0, args.vocab_size - 1)
    for name in _BOOLS:
        if type(getattr(args, name)) is not bool:
            raise _fail(name, "true or false (a JSON boolean, not a string)", getattr(args, name))
    for name in _POSITIVE_FLOATS:
        _check_number(name, getattr(args, name))
    for name in _MULTIPLIERS:
        _check_multipliers(name, getattr(args, name))
    for name in ("num_query_heads", "num_kv_heads"):
        value = getattr(args, name)
        if not isinstance(value, (list, tuple)) or len(value) > MAX_LAYERS:
            raise _fail(name, f"a list of at most {MAX_LAYERS} head counts", value)
        for i, h in enumerate(value):
            _check_int(f"{name}[{i}]", h, 1, 2**16)
    check_quantization(args.quantization)


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_memory(args: ModelArgs, where: str) -> None:
    """Refuse, before any allocation, a model whose weights alone exceed this machine's RAM.

    The weights take at least ``bits/8`` bytes per parameter when quantized, 2 bytes otherwise
    (float16/bfloat16); float32 folders need twice that, so this bound is generous.

    Raises:
        ConfigError: the config implies more memory than the machine has.
    """
    ram = physical_memory()
    quant = args.quantization or {}
    bits = min(
        [quant.get("bits", 16)] + [e.get("bits", 16) for e in quant.values() if isinstance(e, dict)]
    )
    need = args.num_parameters() * bits // 8
    if ram is not None and need > ram:
        raise ConfigError(
            f"{where}: config.json describes {args.num_parameters():,} parameters, at least "
            f"{need / 1e9:.1f} GB of weights, more than this machine's {ram / 1e9:.1f} GB of "
            "memory; check num_transformer_layers, model_dim and the multipliers"
        )
