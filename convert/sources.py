"""Which format a source is, and opening it: hub repo id, HF folder or CoreNet checkpoint.

Auto-detection: an existing folder is an HF folder (it needs ``config.json``); an HF weight file
(``model.safetensors``, ``pytorch_model.bin``, their shards) inside such a folder means that
folder; a ``.gguf`` file is a GGUF; any other file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``,
``.safetensors``) is a CoreNet checkpoint; a name that is no path but looks like ``org/name`` is
a hub repo id.
"""

from __future__ import annotations

import re
from pathlib import Path

from mlx_openelm.choices import SourceFormat, values
from mlx_openelm.errors import ConfigError, ModelNotFoundError
from mlx_openelm.loading import looks_like_repo_id

from .checkpoint import Checkpoint
from .corenet import open_corenet
from .gguf import open_gguf
from .hf import download, is_hf_folder, open_hf_folder

FORMATS = values(SourceFormat)
_HF_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")


def detect_format(source: str | Path) -> str:
    """``"hf"``, ``"corenet"`` or ``"gguf"`` for a source (see the module docstring).

    Raises:
        ModelNotFoundError: the source is neither a file, a folder nor a repo id.
        ConfigError: a folder without ``config.json``.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if is_hf_folder(path):
            return "hf"
        pts = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ckpt"))
        hint = f"; to convert a CoreNet checkpoint pass the file itself ({pts[0]})" if pts else ""
        raise ConfigError(f"{path} is not a Hugging Face model folder: it has no config.json{hint}")
    if path.is_file():
        if _HF_WEIGHT_FILE.fullmatch(path.name) and is_hf_folder(path.parent):
            return "hf"
        if path.suffix.lower() == ".gguf":
            return "gguf"
        return "corenet"
    if looks_like_repo_id(str(source)):
        return "hf"
    raise ModelNotFoundError(
        f"{source} not found: it is neither a file, a folder nor a hub repo id like "
        "apple/OpenELM-270M-Instruct"
    )


def open_source(
    source: str | Path,
    source_format: str | None = None,
    config_yaml: str | Path | None = None,
    size: str | None = None,
    revision: str | None = None,
) -> Checkpoint:
    """Open one source lazily (a hub repo is downloaded first: only the files needed).

    Raises:
        ConfigError, ModelNotFoundError, WeightsError, UnsafePickleError: bad or missing input.
    """
    if source_format is not None and source_format not in FORMATS:
        raise ConfigError(f"unknown source format {source_format!r}; choose hf, corenet or gguf")
    fmt = source_format or detect_format(source)
    path = Path(source).expanduser()
    if fmt == "gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} not found; pass the .gguf file itself")
        if config_yaml is not None or size is not None:
            raise ConfigError("--config-yaml and --size apply to CoreNet checkpoints only")
        return open_gguf(path)
    if fmt == "corenet":
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; pass the CoreNet checkpoint file (.pt) itself")
        if not path.is_file():
            raise ModelNotFoundError(
                f"CoreNet checkpoint {path} not found; pass the .pt file of a CoreNet run"
            )
        return open_corenet(path, Path(config_yaml) if config_yaml else None, size)
    if config_yaml is not None or size is not None:
        raise ConfigError(
            "--config-yaml and --size apply to CoreNet checkpoints only; a Hugging Face source "
            "brings its own config.json"
        )
    if path.is_file():
        path = path.parent
    if path.is_dir():
        if not is_hf_folder(path):
            raise ConfigError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return open_hf_folder(path)
    if not looks_like_repo_id(str(source)):
        raise ModelNotFoundError(f"{source} not found: no such folder, and not a hub repo id")
    folder = download(str(source), revision)
    record = {"format": "hf", "repo_id": str(source), "revision": folder.name}
    return open_hf_folder(folder, source=record)
