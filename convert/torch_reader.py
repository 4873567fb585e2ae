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
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import os
import pickle
import re
import struct
import threading
import types
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np
from numpy._core.multiarray import _reconstruct, scalar

from mlx_openelm.errors import OpenELMError, UnsafePickleError, WeightsError

__all__ = [
    "LazyTensor",
    "TorchCheckpoint",
    "TorchDType",
    "find_state_dict",
    "load_torch_state_dict",
    "open_torch_checkpoint",
]

# Supported tensor dtypes -> little-endian numpy storage dtype; bfloat16 is kept as its raw bits.
_NUMPY_DTYPES = {
    "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "float64": "<f8", "int64": "<i8",
    "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
}  # fmt: skip
_STORAGE_CLASSES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "UntypedStorage": "uint8",  # bytes; _rebuild_tensor_v3 names the element dtype itself
}  # fmt: skip
_DTYPE_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "long": "int64",
                  "int": "int32", "short": "int16"}  # fmt: skip
# torch dtype names we recognise but cannot decode (complex, unsigned > 8 bit, float8, quantized).
_OTHER_TORCH_DTYPE = re.compile(
    r"complex\d+|c(half|float|double)|u?int\d+|qu?int\w+|(float8|bits)\w+"
)
_STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length


@dataclass(frozen=True)
class TorchDType:
    """A torch dtype (``torch.float16``) stored in a checkpoint, e.g. as a config value."""

    name: str


@dataclass(frozen=True)
class _StorageClass:
    dtype: str  # element dtype of a typed storage, or a name we cannot decode


class _Archive:
    """One zip file: its member table and byte-range reads from its members."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.byteorder = "<"
        self._lock = threading.Lock()
        self._data_offsets: dict[str, int] = {}
        self._file: BinaryIO | None = open(path, "rb")  # closed by close()
        try:
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            self._file.close()
            raise WeightsError(
                f"{path}: not a readable zip archive ({exc}); the file is truncated or corrupt. "
                "Download or save it again."
            ) from exc
        self.infos = {info.filename: info for info in self._zip.infolist()}
        stat = os.fstat(self._file.fileno())
        self._signature = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._zip.close()
                self._file.close()
                self._file = self._zip = None

    def read_member(self, name: str) -> bytes:
        """The whole (small) member ``name``, CRC-checked."""
        with self._lock:
            try:
                return self._zip.read(name)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
                raise WeightsError(f"{self.path}: member {name} is corrupt ({exc}).") from exc

    def read_range(self, name: str, start: int, length: int) -> np.ndarray:
        """``length`` bytes of member ``name`` from ``start``, as a writable uint8 array."""
        with self._lock:
            if self._file is not None:
                return self._read(self._file, self._zip, self.infos[name], start, length)
        with open(self.path, "rb") as file:
            stat = os.fstat(file.fileno())
            if (stat.st_size, stat.st_mtime_ns) != self._signature:
                raise WeightsError(
                    f"{self.path} changed on disk after it was opened; open the checkpoint again."
                )
            info = self.infos[name]
            zf = zipfile.ZipFile(file) if info.compress_type != zipfile.ZIP_STORED else None
            return self._read(file, zf, info, start, length)

    def _read(
        self, file: BinaryIO, zf: zipfile.ZipFile | None, info: zipfile.ZipInfo, start: int,
        length: int,
    ) -> np.ndarray:  # fmt: skip
        if start + length > info.file_size:
            raise WeightsError(f"{self.path}: read past the end of {info.filename}; corrupt file.")
        out = np.empty(length, dtype=np.uint8)
        try:
            if info.compress_type == zipfile.ZIP_STORED:
                file.seek(self._data_offset(file, info) + start)
                got = file.readinto(memoryview(out))
            else:  # compressed members must be inflated from their start
                with zf.open(info) as member:
                    member.seek(start)
                    got = member.readinto(memoryview(out))
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise WeightsError(f"{self.path}: cannot read {info.filename} ({exc}).") from exc
        if got != length:
            raise WeightsError(
                f"{self.path}: {info.filename} ends early ({got} of {length} bytes read); "
                "the file is truncated. Download or save it again."
            )
        if start == 0 and length == info.file_size and zlib.crc32(out) != info.CRC:
            raise WeightsError(
                f"{self.path}: {info.filename} fails its CRC check; the file is corrupt. "
                "Download or save it again."
            )
        return out

    def _data_offset(self, file: BinaryIO, info: zipfile.ZipInfo) -> int:
        offset = self._data_offsets.get(info.filename)
        if offset is None:
            file.seek(info.header_offset)
            header = file.read(_ZIP_LOCAL_HEADER.size)
            if len(header) != _ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise WeightsError(
                    f"{self.path}: bad zip header for {info.filename}; corrupt file."
                )
            name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(header)[1:]
            offset = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
            self._data_offsets[info.filename] = offset
        return offset


@dataclass(frozen=True)
class _StorageRef:
    archive: _Archive
    member: str
    dtype: str
    nbytes: int


class LazyTensor:
    """A tensor inside a torch checkpoint; its bytes are read from disk only when asked for.

    Attributes:
        shape: The tensor's shape.
        dtype: One of float32, float16, bfloat16, float64, int64, int32, int16, int8, uint8, bool.
    """

    __slots__ = ("_storage", "_offset", "_stride", "dtype", "shape")

    def __init__(
        self, storage: _StorageRef, dtype: str, offset: int, shape: tuple, stride: tuple
    ) -> None:
        self._storage, self.dtype, self._offset, self.shape, self._stride = (
            storage, dtype, offset, shape, stride
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes once read (contiguous), as in torch."""
        return math.prod(self.shape) * np.dtype(_NUMPY_DTYPES[self.dtype]).itemsize

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype}, member={self._storage.member})"

    def raw(self) -> np.ndarray:
        """The tensor as a contiguous numpy array; bfloat16 comes back as its raw uint16 bits."""
        dtype = np.dtype(_NUMPY_DTYPES[self.dtype]).newbyteorder(self._storage.archive.byteorder)
        if math.prod(self.shape) == 0:
            return np.empty(self.shape, dtype=dtype.newbyteorder("="))
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self._stride, strict=True))
        buf = self._storage.archive.read_range(
            self._storage.member, self._offset * dtype.itemsize, span * dtype.itemsize
        ).view(dtype)
        if self._is_contiguous():
            array = buf.reshape(self.shape)
        else:  # a view (transpose, slice): gather it, then copy to a contiguous array
            strides = tuple(s * dtype.itemsize for s in self._stride)
            array = np.lib.stride_tricks.as_strided(buf, self.shape, strides).copy()
        return array if dtype.isnative else array.astype(dtype.newbyteorder("="))

    def numpy(self) -> np.ndarray:
        """The tensor as a contiguous numpy array; bfloat16 is widened (exactly) to float32."""
        array = self.raw()
        if self.dtype == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def to_mlx(self, dtype: mx.Dtype | None = None) -> mx.array:
        """The tensor as an ``mx.array``: bfloat16 stays bfloat16 (float64 becomes float32).

        Args:
            dtype: Cast to this dtype; ``None`` keeps the stored dtype.
        """
        array = mx.array(self.raw())
        if self.dtype == "bfloat16":
            array = array.view(mx.bfloat16)
        return array if dtype is None or array.dtype == dtype else array.astype(dtype)

    def _is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self._stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def _make_tensor(
    storage: _StorageRef, dtype: str, offset: int, size: Any, stride: Any
) -> LazyTensor:
    if dtype not in _NUMPY_DTYPES:
        raise WeightsError(
            f"{storage.archive.path}: tensor in {storage.member} has dtype {dtype}, which this "
            f"reader does not support ({', '.join(_NUMPY_DTYPES)}). Cast it in torch and re-save."
        )
    shape, strides = tuple(size), tuple(stride)
    values = (offset, *shape, *strides)
    if len(shape) != len(strides) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise WeightsError(f"{storage.archive.path}: bad tensor layout in {storage.member}.")
    itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize
    span = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    if (offset + span) * itemsize > storage.nbytes:
        raise WeightsError(
            f"{storage.archive.path}: a tensor of shape {shape} reads past the end of "
            f"{storage.member} ({storage.nbytes} bytes); the file is truncated or corrupt."
        )
    return LazyTensor(storage, dtype, offset, shape, strides)


# (storage, offset, size, stride, requires_grad, backward_hooks[, metadata]): the last ones do
# not matter here. v3 (dtypes without a typed storage, e.g. uint16) adds dtype after the hooks.
def _rebuild_tensor_v2(storage: _StorageRef, offset: int, size: Any, stride: Any, *_: Any) -> Any:
    return _make_tensor(storage, storage.dtype, offset, size, stride)


def _rebuild_tensor_v3(
    storage: _StorageRef, offset: int, size: Any, stride: Any, *rest: Any
) -> Any:
    return _make_tensor(storage, rest[2].name, offset, size, stride)


def _rebuild_parameter(data: LazyTensor, *_: Any) -> LazyTensor:
    return data  # a Parameter is just its tensor here (requires_grad, hooks, state dropped)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    return func(*args)  # a tensor with Python attributes: func is our _rebuild_tensor_v2


def _codecs_encode(text: str, encoding: str) -> bytes:
    # Protocol 2 stores bytes as _codecs.encode(latin-1 text, "latin1"); nothing else is needed.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unsupported _codecs.encode encoding {encoding!r}")
    return text.encode("latin-1")


def _torch_device(kind: str, index: int | None = None) -> str:  # torch.device('cuda', 0)
    return kind if index is None else f"{kind}:{index}"


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): "torch.Tensor",  # only ever the new_type of _rebuild_from_type_v2
    ("torch.nn.parameter", "Parameter"): "torch.nn.Parameter",
    ("torch", "Size"): tuple,
    ("torch", "device"): _torch_device,
    ("collections", "OrderedDict"): OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy._core.multiarray", "scalar"): scalar,
    ("numpy.core.multiarray", "scalar"): scalar,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
}
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # Python 2 names


def _private_copy(value: Any) -> Any:
    if isinstance(value, types.FunctionType):
        return functools.partial(value)
    if value is argparse.Namespace:
        return type("Namespace", (argparse.Namespace,), {"__module__": "argparse"})
    return value  # strings, builtin / C types and functions: immutable


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` with an allow-list of globals and lazy storages."""

    def __init__(self, data: bytes, archive: _Archive, prefix: str) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._archive, self._prefix = archive, prefix
        # Fresh copies of the mutable allowed objects for every load: the BUILD opcode can set
        # attributes on whatever the pickle names, and must not reach module-level state.
        self._globals = {key: _private_copy(value) for key, value in _SAFE_GLOBALS.items()}

    def find_class(self, module: str, name: str) -> Any:
        module = _MODULE_ALIASES.get(module, module)
        if (module, name) in self._globals:
            return self._globals[(module, name)]
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            return _StorageClass(_STORAGE_CLASSES.get(name, name))
        if module == "torch" and (name in _NUMPY_DTYPES or name in _DTYPE_ALIASES):
            return TorchDType(_DTYPE_ALIASES.get(name, name))
        if module == "torch" and _OTHER_TORCH_DTYPE.fullmatch(name):
            return TorchDType(name)
        if module == "torch._utils" and name.startswith("_rebuild_"):
            raise WeightsError(
                f"{self._archive.path}: holds a tensor kind this reader does not support "
                f"(torch._utils.{name}: sparse, quantized, nested or subclass tensors). Convert "
                "the tensors to dense ones in torch and re-save."
            )
        raise UnsafePickleError(
            f"{self._archive.path}: refused to load: its pickle ({self._prefix}/data.pkl) asks for "
            f"the global '{module}.{name}', which is not needed to rebuild tensors or containers, "
            "so it was refused before it could run. The file may be malicious: only use "
            "checkpoints from sources you trust. If you trust this one, load it with torch "
            "(torch.load(path, weights_only=False)), save just the model's state_dict() with "
            "torch.save or as safetensors, and convert that file."
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_class, key = pid[1], pid[2]
        member = f"{self._prefix}/data/{key}"
        if not isinstance(storage_class, _StorageClass) or member not in self._archive.infos:
            raise pickle.UnpicklingError(f"storage {key!r} ({storage_class!r}) is not in the file")
        nbytes = self._archive.infos[member].file_size
        return _StorageRef(self._archive, member, storage_class.dtype, nbytes)


class TorchCheckpoint:
    """An open torch checkpoint; use as a context manager (tensors stay readable after close).

    Attributes:
        path: The checkpoint file.
        obj: The unpickled top-level object, with every tensor a :class:`LazyTensor`.
    """

    def __init__(self, path: Path, archive: _Archive, obj: Any) -> None:
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
    archive = _Archive(path)
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
        try:
            obj = _RestrictedUnpickler(data, archive, prefix).load()
        except OpenELMError:
            raise
        except Exception as exc:  # any malformed pickle: report it as what it is, a bad file
            raise WeightsError(
                f"{path}: cannot unpickle {prefix}/data.pkl ({type(exc).__name__}: {exc}); the "
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


def _find_prefix(archive: _Archive) -> str:
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
