"""A summary of a model folder, read from its config and safetensors headers (no weights loaded)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .config import ModelArgs
from .errors import TokenizerError
from .folder import safetensors_header
from .jsonio import read_json
from .loading import load_config, resolve_model_path
from .runtime import plan_execution


def describe_model(model: str | Path) -> dict[str, Any]:
    """Architecture facts of a model folder (or hub id), for ``mlx-openelm info``."""
    folder = resolve_model_path(model)
    config = load_config(folder)
    args = ModelArgs.from_dict(config)
    dtypes: set[str] = set()
    names: set[str] = set()
    for f in sorted(folder.glob("model*.safetensors")):
        header = safetensors_header(f)
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        names |= set(header) - {"__metadata__"}
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
        "quantized": _quantized_parts(names),
        "runs_as": plan_execution(args.quantization, 4 * args.num_parameters()).describe(),
        "chat_template": "yes" if has_template else "no",
        "num_query_heads": args.num_query_heads,
        "num_kv_heads": args.num_kv_heads,
        "ffn_dims": args.ffn_dims,
    }


_BLOCK_LINEAR = re.compile(r"\.(qkv_proj|out_proj|proj_1|proj_2)\.weight$")


def _quantized_parts(names: set[str]) -> str:
    """Which modules the folder stores quantized (those with ``.scales``), in a few words."""
    paths = {n.removesuffix(".scales") for n in names if n.endswith(".scales")}
    if not paths:
        return "nothing"
    blocks = [n for n in names if _BLOCK_LINEAR.search(n)]
    linear = [p for p in paths if _BLOCK_LINEAR.search(f"{p}.weight")]
    parts = [f"{len(linear)} of {len(blocks)} block linear layers"]
    if "lm_head" in paths:
        parts.append("lm_head")
    if "transformer.token_embeddings" in paths:
        head = "" if "lm_head.weight" in names or "lm_head" in paths else " (also the output head)"
        parts.append(f"token embedding{head}")
    else:
        parts.append("token embedding kept float")
    return ", ".join(parts)
