"""A summary of a model folder, read from its config and safetensors headers (no weights loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ModelArgs
from .errors import TokenizerError
from .folder import safetensors_header
from .jsonio import read_json
from .loading import load_config, resolve_model_path


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
