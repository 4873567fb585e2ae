"""Read PyTorch ``.pt`` / ``.bin`` checkpoints without torch, safely and lazily.

``torch.save`` (torch >= 1.6) writes a zip archive: ``<prefix>/data.pkl`` is a protocol-2 pickle
of the saved object, and each tensor storage is a raw little-endian member ``<prefix>/data/<key>``
that the pickle names by a persistent id ``('storage', StorageType, key, location, numel)``.

Safety: the pickle is read by a restricted unpickler whose ``find_class`` hands out only the globals
needed to rebuild tensors and plain containers, mapped to our own stand-ins (nothing is imported
from the pickle's names). Any other global (``os.system``, ``builtins.eval``...) raises
:class:`UnsafePickleError` before it can run.

Laziness and lifetime: opening a checkpoint reads the zip directory and ``data.pkl`` only; each
tensor becomes a :class:`LazyTensor` that remembers its member, byte offset, shape and strides and
reads just those bytes when asked. While a :class:`TorchCheckpoint` is open, reads share its one
file handle; after it is closed (``load_torch_state_dict`` closes at once) each read reopens the
file for that one read, so tensors stay usable, no descriptor stays open (opening many shards is
cheap), and a file changed on disk since it was opened is reported instead of read.

Layout: :mod:`.torch_storage` holds the zip archive and :class:`LazyTensor`, :mod:`.torch_pickle`
the restricted unpickler; this module opens checkpoints and finds their state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlx_openelm.errors import OpenELMError, WeightsError, short

# _rebuild_tensor_v2 (torch's own name) is re-exported for the tests, which reach into it.
from .torch_pickle import RestrictedUnpickler, TorchDType, check_pickle_bounds
from .torch_pickle import _rebuild_tensor_v2 as _rebuild_tensor_v2
from .torch_storage import Archive, LazyTensor

__all__ = [
    "LazyTensor",
    "TorchCheckpoint",
    "TorchDType",
    "find_state_dict",
    "load_torch_state_dict",
    "open_torch_checkpoint",
]

_STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")


class TorchCheckpoint:
    """An open torch checkpoint; use as a context manager (tensors stay readable after close).

    Attributes:
        path: The checkpoint file.
        obj: The unpickled top-level object, with every tensor a :class:`LazyTensor`.
    """

    def __init__(self, path: Path, archive: Archive, obj: Any) -> None:
        self.path, self.obj, self._archive = path, obj, archive

    def state_dict(self) -> dict[str, LazyTensor]:
        """The model weights: see :func:`find_state_dict`."""
        return find_state_dict(self.obj, self.path)

    def close(self) -> None:
        """Release the file handle; later tensor reads reopen the file for each read."""
        self._archive.close()

    def __enter__(self) -> TorchCheckpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_torch_checkpoint(path: str | Path) -> TorchCheckpoint:
    """Open a ``torch.save`` zip checkpoint, reading only its directory and pickle.

    Args:
        path: A ``.pt`` / ``.bin`` / ``.pth`` file written by ``torch.save`` (torch >= 1.6).

    Returns:
        The open checkpoint; its tensors are read lazily.

    Raises:
        WeightsError: The file is missing, legacy (non-zip), TorchScript, truncated or corrupt.
        UnsafePickleError: The pickle asks for a global outside the allow-list.
    """
    path = Path(path)
    _check_header(path)
    archive = Archive(path)
    try:
        prefix = _find_prefix(archive)
        byteorder_member = f"{prefix}/byteorder"
        if byteorder_member in archive.infos:
            byteorder = archive.read_member(byteorder_member).decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise WeightsError(
                    f"{path}: unknown byteorder {byteorder!r} in {byteorder_member}."
                )
            archive.byteorder = "<" if byteorder == "little" else ">"
        data = archive.read_member(f"{prefix}/data.pkl")
        check_pickle_bounds(data, f"{path}: {prefix}/data.pkl")
        try:
            obj = RestrictedUnpickler(data, archive, prefix).load()
        except OpenELMError:
            raise
        except Exception as exc:  # any malformed pickle: report it as what it is, a bad file
            raise WeightsError(
                f"{path}: cannot unpickle {prefix}/data.pkl ({type(exc).__name__}: "
                f"{short(exc, 200)}); the "
                "file is corrupt or uses a torch feature this reader does not support."
            ) from exc
    except BaseException:
        archive.close()
        raise
    return TorchCheckpoint(path, archive, obj)


def load_torch_state_dict(path: str | Path) -> dict[str, LazyTensor]:
    """The state dict of a torch checkpoint, as lazy tensors (no file handle is kept open).

    Raises:
        WeightsError: As :func:`open_torch_checkpoint`, or no state dict is found.
        UnsafePickleError: As :func:`open_torch_checkpoint`.
    """
    with open_torch_checkpoint(path) as checkpoint:
        return checkpoint.state_dict()


def find_state_dict(obj: Any, path: str | Path) -> dict[str, LazyTensor]:
    """The mapping of weight names to tensors inside an unpickled checkpoint.

    Args:
        obj: The checkpoint's top-level object: a state dict itself, or a training checkpoint
            holding one under ``model_state_dict``, ``state_dict`` or ``model``.
        path: The checkpoint file, for error messages.

    Returns:
        A new dict (the checkpoint's own is left untouched), in the file's order.

    Raises:
        WeightsError: No mapping of names to tensors is found; says which keys there are.
    """
    if _is_state_dict(obj):
        return dict(obj)
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{path}: no state dict found: the checkpoint holds a {type(obj).__name__}, not a "
            "mapping of weight names to tensors."
        )
    for key in _STATE_DICT_KEYS:
        if _is_state_dict(obj.get(key)):
            return dict(obj[key])
    non_tensors = [k for k, v in obj.items() if not isinstance(v, LazyTensor)]
    if len(non_tensors) < len(obj):  # some tensors: a state dict with stray entries
        raise WeightsError(
            f"{path}: the checkpoint mixes tensors with other values under keys "
            f"{_some(non_tensors)}; expected a mapping of weight names to tensors only."
        )
    raise WeightsError(
        f"{path}: no state dict found: expected a mapping of weight names to tensors, or a "
        f"training checkpoint holding one under {', '.join(map(repr, _STATE_DICT_KEYS))}; the "
        f"top-level keys are {_some(list(obj))}."
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, LazyTensor) for k, v in obj.items())
    )


def _some(keys: list[Any], limit: int = 20) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit]) or "(none)"
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_header(path: Path) -> None:
    try:
        with open(path, "rb") as file:
            head = file.read(512)
    except FileNotFoundError as exc:
        raise WeightsError(f"{path}: no such file.") from exc
    except IsADirectoryError as exc:
        raise WeightsError(f"{path} is a directory; pass the .pt / .bin file itself.") from exc
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc}).") from exc
    if head.startswith(b"PK"):
        return
    if head.startswith(b"\x80") or head[257:262] == b"ustar":  # a pickle or a tar: torch < 1.6
        raise WeightsError(
            f"{path} is a legacy (non-zip) torch checkpoint, which is not supported. Re-save it "
            "with a recent torch: torch.save(torch.load(path), new_path, "
            "_use_new_zipfile_serialization=True)."
        )
    kind = "empty" if not head else "a safetensors file" if head[8:9] == b"{" else "not a zip"
    raise WeightsError(f"{path} is not a torch checkpoint ({kind}: starts with {head[:8]!r}).")


def _find_prefix(archive: Archive) -> str:
    names = archive.infos
    prefixes = [
        n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1
    ]
    if len(prefixes) != 1:
        raise WeightsError(
            f"{archive.path}: not a torch.save archive (expected one '<name>/data.pkl' member, "
            f"found {len(prefixes)}); it holds {_some(list(names), 8)}."
        )
    prefix = prefixes[0]
    if f"{prefix}/constants.pkl" in names or any(n.startswith(f"{prefix}/code/") for n in names):
        raise WeightsError(
            f"{archive.path} is a TorchScript archive (torch.jit.save), not a checkpoint. Save "
            "the model's weights with torch.save(model.state_dict(), path) and convert that."
        )
    return prefix
