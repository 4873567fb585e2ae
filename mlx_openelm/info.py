"""A summary of a model folder, read from its config and safetensors headers (no weights loaded)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from .config import ModelArgs
from .errors import TokenizerError, WeightsError, short
from .jsonio import parse_json, read_json
from .loading import load_config, resolve_model_path

_MAX_HEADER_BYTES = 100 * 2**20
_MAX_DIMS = 8


def _entry_problem(name: str, entry: Any) -> str | None:
    """Why one header entry is malformed, or None: checked before any arithmetic uses it."""
    if not isinstance(entry, dict):
        return f"{short(name, 80)} is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return f"{short(name, 80)} has no string 'dtype'"
    if not (
        isinstance(shape, list)
        and len(shape) <= _MAX_DIMS
        and all(type(d) is int and 0 <= d < 2**48 for d in shape)
    ):
        return f"{short(name, 80)} has 'shape' {short(shape, 60)}, not a list of sizes"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        return f"{short(name, 80)} has 'data_offsets' {short(offsets, 60)}, not [begin, end]"
    return None


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, its entries' types checked.

    Every tensor entry is an object with a string ``dtype``, a ``shape`` of at most 8
    non-negative ints and ``data_offsets`` ``[begin, end]`` with ``0 <= begin <= end``, so callers
    may do arithmetic on them; sizes against the file are checked by the caller.

    Raises:
        WeightsError: a truncated, non-JSON or malformed header, naming the file.
    """
    how = "download or convert it again"
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} is implausible")
            raw = f.read(n)
        if len(raw) != n:
            raise ValueError("file ends inside the header")
    except (OSError, struct.error, ValueError) as e:
        raise WeightsError(f"{path} is not a valid safetensors file ({e}); {how}") from None
    header = parse_json(
        raw, f"{path}", WeightsError, f"it is not a valid safetensors file; {how}", dict
    )
    problems = [
        problem
        for name, entry in header.items()
        if name != "__metadata__" and (problem := _entry_problem(name, entry))
    ]
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        problems.append("'__metadata__' is not an object")
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise WeightsError(f"{path} has a malformed header: {'; '.join(problems[:5])}{more}; {how}")
    return header


def describe_model(model: str | Path) -> dict[str, Any]:
    """Architecture facts of a model folder (or hub id), for ``mlx-openelm info``."""
    folder = resolve_model_path(model)
    config = load_config(folder)
    args = ModelArgs.from_dict(config)
    dtypes: set[str] = set()
    for f in sorted(folder.glob("model*.safetensors")):
        header = safetensors_header(f)
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    tok_cfg = folder / "tokenizer_config.json"
    has_template = tok_cfg.is_file() and "chat_template" in read_json(tok_cfg, TokenizerError)
    return {
        "path": str(folder),
        "parameters": args.num_parameters(),
        "layers": args.num_transformer_layers,
        "model_dim": args.model_dim,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "dtype": ",".join(sorted(dtypes)) or "none",
        "quantization": args.quantization or "none",
        "chat_template": "yes" if has_template else "no",
        "num_query_heads": args.num_query_heads,
        "num_kv_heads": args.num_kv_heads,
        "ffn_dims": args.ffn_dims,
    }
