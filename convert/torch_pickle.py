"""The restricted unpickler for ``data.pkl`` inside a torch checkpoint.

The pickle is protocol 2 and names each tensor storage by a persistent id
``('storage', StorageType, key, location, numel)``; storages become ``StorageRef`` and tensors
:class:`~.torch_storage.LazyTensor` (nothing is read yet).

Safety: ``find_class`` hands out only the globals needed to rebuild tensors and plain containers,
mapped to our own stand-ins (nothing is imported from the pickle's names). Any other global
(``os.system``, ``builtins.eval``...) raises :class:`UnsafePickleError` before it can run.
"""

from __future__ import annotations

import argparse
import functools
import io
import pickle
import pickletools
import re
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy._core.multiarray import _reconstruct, scalar

from mlx_openelm.errors import UnsafePickleError, WeightsError, short

from .torch_storage import NUMPY_DTYPES, Archive, LazyTensor, StorageRef, make_tensor

__all__ = ["TorchDType"]

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


@dataclass(frozen=True)
class TorchDType:
    """A torch dtype (``torch.float16``) stored in a checkpoint, e.g. as a config value."""

    name: str


@dataclass(frozen=True)
class _StorageClass:
    dtype: str  # element dtype of a typed storage, or a name we cannot decode


# (storage, offset, size, stride, requires_grad, backward_hooks[, metadata]): the last ones do
# not matter here. v3 (dtypes without a typed storage, e.g. uint16) adds dtype after the hooks.
def _rebuild_tensor_v2(storage: StorageRef, offset: int, size: Any, stride: Any, *_: Any) -> Any:
    return make_tensor(storage, storage.dtype, offset, size, stride)


def _rebuild_tensor_v3(storage: StorageRef, offset: int, size: Any, stride: Any, *rest: Any) -> Any:
    return make_tensor(storage, rest[2].name, offset, size, stride)


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


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def check_pickle_bounds(data: bytes, where: str) -> None:
    """Walk the opcodes once before unpickling: refuse memo indices beyond the pickle's size.

    The C unpickler sizes its memo table to the largest index a PUT names, so a 141-byte pickle
    with ``LONG_BINPUT 4000000000`` would allocate gigabytes; an honest pickle numbers its memo
    entries from 0, one per PUT, so every index is below the number of bytes.

    Raises:
        WeightsError: a malformed opcode stream or an out-of-range memo index.
    """
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _MEMO_OPS and not (isinstance(arg, int) and 0 <= arg < len(data)):
                raise ValueError(f"memo index {short(arg, 40)} in a {len(data)}-byte pickle")
    except ValueError as exc:
        raise WeightsError(
            f"{where}: cannot unpickle it ({short(exc, 200)}); the file is corrupt or hostile."
        ) from None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` with an allow-list of globals and lazy storages."""

    def __init__(self, data: bytes, archive: Archive, prefix: str) -> None:
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
        if module == "torch" and (name in NUMPY_DTYPES or name in _DTYPE_ALIASES):
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

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {short(repr(pid), 120)}")
        storage_class, key = pid[1], pid[2]
        member = f"{self._prefix}/data/{key}"
        if not isinstance(storage_class, _StorageClass) or member not in self._archive.infos:
            raise pickle.UnpicklingError(
                f"storage {short(repr(key), 80)} ({short(repr(storage_class), 80)}) is not in "
                "the file"
            )
        nbytes = self._archive.infos[member].file_size
        return StorageRef(self._archive, member, storage_class.dtype, nbytes)
