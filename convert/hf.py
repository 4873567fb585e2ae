"""Hugging Face sources: ``apple/OpenELM-*`` hub repos and local HF folders.

A folder holds ``config.json`` (Apple's field names) and the weights as ``model.safetensors``,
shards with ``model.safetensors.index.json``, ``pytorch_model.bin`` or ``.bin`` shards with
``pytorch_model.bin.index.json``. Apple's HF tensor names are ours already; the table only drops
derived buffers some exports save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import ConfigError, ModelNotFoundError, WeightsError
from mlx_openelm.jsonio import read_json

from .checkpoint import Checkpoint, Rule
from .tensors import open_weight_files, read_index

HF_RULES: list[Rule] = [
    (r".*\.inv_freq$", None),  # RoPE frequency tables: derived, recomputed by the model
    (r"^transformer\.causal_mask$", None),  # a derived mask buffer in some exports
    # Apple's OpenELMModel keeps an untied `classifier` that OpenELMForCausalLM never applies (its
    # forward uses `lm_head`), so save_pretrained of an untied model stores both.
    (r"^transformer\.classifier\.weight$", None),
]

# What a conversion needs from a hub repo (safetensors preferred; .bin only as a fallback).
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
]
HUB_BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]

# (index file, single file, shard glob) in order of preference.
_LAYOUTS = [
    ("model.safetensors.index.json", "model.safetensors", "model-*.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model-*.bin"),
]


def is_hf_folder(path: Path) -> bool:
    """A folder with a ``config.json``."""
    return path.is_dir() and (path / "config.json").is_file()


def read_config(folder: Path) -> ModelArgs:
    """The model config of an HF folder.

    Raises:
        ConfigError: unreadable JSON, another ``model_type`` or a bad field (naming the file).
    """
    path = folder / "config.json"
    params = read_json(path, ConfigError, "download it again")
    try:
        return ModelArgs.from_dict(params)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder (safetensors preferred over .bin).

    Raises:
        WeightsError: no weights, or shards without their index.
    """
    for index_name, single_name, shard_glob in _LAYOUTS:
        index, single = folder / index_name, folder / single_name
        if index.is_file():
            return read_index(index)
        if single.is_file():
            return [single]
        if sorted(folder.glob(shard_glob)):
            raise WeightsError(
                f"{folder} has {shard_glob} shards but no {index_name}; download the index file too"
            )
    raise WeightsError(
        f"{folder} has a config.json but no weights: expected model.safetensors, sharded "
        "model-*.safetensors with model.safetensors.index.json, or pytorch_model.bin (single or "
        "sharded with its index); download the weight files"
    )


def open_hf_folder(folder: Path, source: dict[str, Any] | None = None) -> Checkpoint:
    """Open a local HF folder lazily; ``source`` overrides the record (hub repos).

    Raises:
        ConfigError, WeightsError, UnsafePickleError: as the files demand.
    """
    args = read_config(folder)
    files = weight_files(folder)
    tensors = open_weight_files(files)
    gen_path = folder / "generation_config.json"
    generation_config = None
    if gen_path.is_file():
        generation_config = read_json(gen_path, ConfigError, "fix or remove it")
    return Checkpoint(
        format="hf",
        args=args,
        tensors=tensors,
        rules=HF_RULES,
        source=source or {"format": "hf", "path": str(folder.absolute())},
        name=folder.name if source is None else source["repo_id"],
        folder=folder,
        generation_config=generation_config,
        files=files,
    )


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch only the files a conversion needs from a hub repo; returns the snapshot folder.

    huggingface_hub handles ``HF_TOKEN``, ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``.

    Raises:
        ModelNotFoundError: unknown or gated repo, unknown revision, or offline and not cached.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):
            folder = Path(
                snapshot_download(repo_id, revision=revision, allow_patterns=HUB_BIN_PATTERNS)
            )
    except GatedRepoError as e:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its license on huggingface.co and set HF_TOKEN"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"hub repo {repo_id} not found (or private: set HF_TOKEN); check the name, "
            "e.g. apple/OpenELM-270M-Instruct"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); connect once or convert a local folder"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"cannot download {repo_id}: {e}") from e
    return folder
