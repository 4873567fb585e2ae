"""Decoding defaults that come from the model rather than from mlx-lm.

Two sources, below whatever the user sets:

1. the model's ``generation_config.json`` (the converter copies it from the source), when it
   carries sampling fields: Hugging Face's ``do_sample``/``temperature``/``top_k``/``top_p``/
   ``min_p``, ``repetition_penalty`` (Hugging Face's whole-context one), ``max_new_tokens``,
   ``prompt_lookup_num_tokens`` and ``max_matching_ngram_size``;
2. for OpenELM-Instruct models in ``chat`` and ``serve``, what Apple's model card uses in every
   example: ``repetition_penalty=1.2`` (whole context) and ``prompt_lookup_num_tokens=10``.

``generate`` takes only (1), and ``generate --raw`` neither: a base model stays plain greedy
unless asked. A draft model or a rotating cache (``--max-kv-size``) leaves prompt lookup off.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .errors import GenerationError, short
from .generate_options import GenerationOptions

__all__ = ["INSTRUCT_DEFAULTS", "from_generation_config", "with_model_defaults"]

INSTRUCT_DEFAULTS: Mapping[str, Any] = {
    "repetition_penalty": 1.2,
    "repetition_scope": "context",
    "prompt_lookup_num_tokens": 10,
}
_LOOKUP = ("prompt_lookup_num_tokens", "prompt_lookup_max_ngram", "prompt_lookup_min_ngram")
HF_TOP_K = 50  # transformers' GenerationConfig default, in force when do_sample is true


def from_generation_config(folder: str | Path) -> dict[str, Any]:
    """The sampling fields of ``folder/generation_config.json`` as option values ({} if none).

    A file that is missing or unreadable gives no defaults: it is optional metadata.

    Raises:
        GenerationError: a sampling field that is not a number (``"temperature": "hot"``).
    """
    path = Path(folder) / "generation_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict):
        return {}

    def number(key: str, default: float | None = None) -> Any:
        value = cfg.get(key, default)
        if value is not None and not _is_number(value):
            raise GenerationError(
                f"{path}: {key} must be a number, got {short(repr(value), 60)}; fix or remove it"
            )
        return value

    out: dict[str, Any] = {}
    if cfg.get("do_sample") is True:
        out["temp"] = float(number("temperature", 1.0))
        top_k = number("top_k", HF_TOP_K) or 0
        out["top_k"] = int(top_k) if float(top_k).is_integer() else top_k  # 2.5: refused later
        out["top_p"] = float(number("top_p", 1.0))
        if number("min_p") is not None:
            out["min_p"] = float(cfg["min_p"])
    elif cfg.get("do_sample") is False:
        out["temp"] = 0.0
    if number("repetition_penalty") not in (None, 1.0):
        out["repetition_penalty"] = float(cfg["repetition_penalty"])
        out["repetition_scope"] = "context"
    names = {
        "max_new_tokens": "max_tokens",
        "prompt_lookup_num_tokens": "prompt_lookup_num_tokens",
        "max_matching_ngram_size": "prompt_lookup_max_ngram",
    }
    for hf, ours in names.items():
        if isinstance(cfg.get(hf), int) and not isinstance(cfg.get(hf), bool):
            out[ours] = cfg[hf]
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def with_model_defaults(
    options: GenerationOptions,
    folder: str | Path,
    *,
    instruct: bool,
    explicit: Collection[str] = (),
    draft: bool = False,
) -> GenerationOptions:
    """``options`` with the model's defaults filled in where the user set nothing.

    Args:
        folder: the model folder (its ``generation_config.json``).
        instruct: apply :data:`INSTRUCT_DEFAULTS` under the file's fields (chat and serve).
        explicit: option names the user set (they are never replaced).
        draft: a draft model is in use (prompt lookup stays off).

    Raises:
        GenerationError: the defaults make an out-of-range option (a bad generation_config).
    """
    defaults = {**(INSTRUCT_DEFAULTS if instruct else {}), **from_generation_config(folder)}
    if draft or options.max_kv_size is not None:
        defaults = {k: v for k, v in defaults.items() if k not in _LOOKUP}
    changes = {k: v for k, v in defaults.items() if k not in explicit}
    return options.replace(**changes).validate() if changes else options
