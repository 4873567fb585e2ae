"""CoreNet sources: Apple's training checkpoints (``.pt``) with their training YAML.

CoreNet's ``GeneralGPTModel`` names its tensors like the HF port without the ``transformer.``
prefix (``token_embeddings.weight``, ``layers.N.attn.qkv_proj.weight``, ``norm.weight``) and calls
an untied output head ``classifier``. A training checkpoint wraps the state dict (under
``model_state_dict``); the torch reader finds it. A ``.safetensors`` file with CoreNet names (as
Apple's MLX example writes) is read the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import ConfigError
from mlx_openelm.jsonio import read_yaml

from .checkpoint import Checkpoint, Rule
from .tensors import RowSlice, TensorRef, open_weight_files

CORENET_RULES: list[Rule] = [
    (r"^classifier\.", "lm_head."),
    (r"^(token_embeddings|layers|norm)\.", r"transformer.\1."),
]
_SECTION = ("model", "language_modeling", "general_gpt")


def load_corenet_config(path: Path) -> ModelArgs:
    """The model config from a CoreNet training YAML (``model.language_modeling.general_gpt``).

    Raises:
        ConfigError: unreadable YAML, no such section, or an unknown ``model_name``.
    """
    data = read_yaml(path, ConfigError, "pass the CoreNet training YAML of the checkpoint")
    section: Any = data
    for key in _SECTION:
        section = section.get(key) if isinstance(section, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(
            f"{path} has no '{'.'.join(_SECTION)}' section; pass the CoreNet training YAML the "
            "checkpoint was trained with (e.g. openelm_270M.yaml), or --size instead"
        )
    try:
        return ModelArgs.from_corenet(section)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def open_corenet(
    path: Path, config_yaml: Path | None = None, size: str | None = None
) -> Checkpoint:
    """Open a CoreNet checkpoint lazily, with its config from ``config_yaml`` or ``size``.

    Raises:
        ConfigError: neither or both of ``config_yaml`` and ``size`` given, or a bad config.
        WeightsError, UnsafePickleError: an unreadable or unsafe checkpoint.
    """
    if (config_yaml is None) == (size is None):
        raise ConfigError(
            f"{path} is a CoreNet checkpoint: pass its training YAML with --config-yaml FILE "
            "or its size with --size 270M|450M|1_1B|3B (one of the two)"
        )
    args = load_corenet_config(config_yaml) if config_yaml else ModelArgs.from_preset(str(size))
    tensors = _drop_padding_rows(open_weight_files([path]), args)
    return Checkpoint(
        format="corenet",
        args=args,
        tensors=tensors,
        rules=CORENET_RULES,
        source={"format": "corenet", "path": str(path.absolute())},
        name=path.name,
        files=[path],
    )


def _drop_padding_rows(tensors: dict[str, TensorRef], args: ModelArgs) -> dict[str, TensorRef]:
    # CoreNet trains with vocab_size 32128: the 32000 Llama-2 tokens, the padding index 32000 and
    # rows up to a hardware-friendly multiple. Only the first 32000 rows can ever be produced by
    # the tokenizer (and predicted usefully), so the MLX model keeps exactly those.
    out = dict(tensors)
    for name in ("token_embeddings.weight", "classifier.weight"):
        ref = out.get(name)
        if ref is not None and len(ref.shape) == 2 and ref.shape[0] > args.vocab_size:
            out[name] = RowSlice(ref, args.vocab_size)
    return out
