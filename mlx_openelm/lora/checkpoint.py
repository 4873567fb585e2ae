"""Training checkpoints: everything a resumed run needs to continue the same loss curve.

``ADAPTERS/checkpoint/`` holds ``adapters.safetensors`` (the trained tensors),
``optimizer.safetensors`` (moments and the step counter, which also positions the learning-rate
schedule) and ``state.json`` (step, epoch, position in the epoch, that epoch's row order, the
random-seed scheme, best-validation bookkeeping and the settings that shaped the run). The folder
is written beside the old one and renamed into place, so a crash mid-save keeps the previous one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import ConfigError, OutputExistsError
from ..folder import atomic_output
from ..jsonio import read_json
from ..outputs import check_replaceable
from .adapters import ADAPTER_FILE, adapter_tensors

CHECKPOINT_DIR = "checkpoint"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def save_checkpoint(
    adapter_dir: Path, model: nn.Module, optimizer: optim.Optimizer, state: dict[str, Any]
) -> Path:
    """Atomically replace ``adapter_dir/checkpoint`` with the current training state."""
    target = Path(adapter_dir) / CHECKPOINT_DIR
    opt_state = dict(tree_flatten(optimizer.state))
    with atomic_output(target, force=True) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), adapter_tensors(model))
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), opt_state)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    return target


def load_checkpoint(adapter_dir: Path) -> tuple[dict[str, mx.array], dict, dict[str, Any]]:
    """``(adapter tensors, optimizer state tree, state dict)`` of ``adapter_dir/checkpoint``.

    Raises:
        ConfigError: no checkpoint there (with how to get one).
    """
    folder = Path(adapter_dir) / CHECKPOINT_DIR
    files = [folder / n for n in (ADAPTER_FILE, OPTIMIZER_FILE, STATE_FILE)]
    if not all(f.is_file() for f in files):
        raise ConfigError(
            f"--resume: {folder} holds no complete checkpoint; checkpoints are written every "
            "--save-every steps (start without --resume)"
        )
    state = read_json(files[2], ConfigError, "start without --resume")
    if type(state.get("step")) is not int or not isinstance(state.get("identity"), dict):
        raise ConfigError(
            f"{files[2]} lacks an integer 'step' and an 'identity'; start without --resume"
        )
    opt_state = tree_unflatten(list(mx.load(str(files[1])).items()))
    return mx.load(str(files[0])), opt_state, state


def _describe(section: str, name: str, old: Any, new: Any) -> str:
    if section == "data":
        return f"the data changed ({name} was {old!r}, now {new!r})"
    if section == "model":
        return f"the base model changed ({name} was {old!r}, now {new!r})"
    if name == "iters":  # only a constant schedule may be extended (see Trainer._curve_settings)
        return f"--iters was {old!r}, now {new!r} (the learning-rate schedule spans --iters)"
    return f"--{name.replace('_', '-')} was {old!r}, now {new!r}"


def check_resume(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume when anything that shapes the loss curve changed.

    ``saved``/``current`` map section → {setting: value} (hyper-parameters, adapter, model, data).

    Raises:
        ConfigError: naming every changed setting with its old and new value.
    """
    changes = []
    for section, values in current.items():
        old_values = saved.get(section, {})
        for key, value in values.items():
            if key == "iters" and key not in old_values:
                continue  # a constant-schedule run records no length (any schedule change shows)
            old = old_values.get(key)
            if json.loads(json.dumps(old)) != json.loads(json.dumps(value)):
                changes.append(_describe(section, key, old, value))
    if changes:
        raise ConfigError(
            "cannot resume with changed settings (the loss curve would not continue): "
            + "; ".join(changes)
            + ". Use the original settings, or train into a new --adapter-path"
        )


def check_adapter_folder(path: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite an existing run, or to resume one that has no checkpoint.

    Raises:
        OutputExistsError: ``path`` exists, no ``resume`` nor ``force``.
        ConfigError: ``resume`` without a checkpoint in ``path``.
    """
    path = Path(path)
    if resume:
        if not (path / CHECKPOINT_DIR / "state.json").is_file():
            raise ConfigError(
                f"--resume: {path / CHECKPOINT_DIR} holds no checkpoint; checkpoints are written "
                "every --save-every steps (start without --resume)"
            )
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        if force:
            check_replaceable(path)
            return
        raise OutputExistsError(
            f"adapter folder {path} already exists; pass --resume to continue it, "
            "--force to replace it, or choose another --adapter-path"
        )
