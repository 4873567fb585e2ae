"""Write ``torch.save``-format checkpoints in pure Python, for tests (no torch needed).

Independent of the reader under test: the pickle is emitted opcode by opcode (protocol 2, like
``torch.save``), and the zip is laid out byte for byte like torch's ``PyTorchFileWriter`` output:
members ``<archive>/data.pkl``, ``.format_version``, ``.storage_alignment``, ``byteorder``,
``data/<key>``..., ``version`` ("3\\n"), ``.data/serialization_id``; all STORED, data padded to
64-byte alignment with an ``FB`` extra field, data descriptors (flag 0x0808), ZIP64 end records.

Build objects from plain Python values plus :class:`Tensor` (:func:`from_numpy` or views of a
shared :class:`Storage`), :class:`Parameter`, :class:`Size`, :class:`Global`, :class:`Reduce` and
:class:`Obj`, then :func:`save` them. ``Reduce(Global("os", "system"), ("...",))`` emits exactly
what a malicious pickle would.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STORAGE_CLASSES = {
    "float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
    "float64": "DoubleStorage", "int64": "LongStorage", "int32": "IntStorage",
    "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
}  # fmt: skip
NUMPY_DTYPES = {
    "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "float64": "<f8", "int64": "<i8",
    "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
}  # fmt: skip


@dataclass(eq=False)
class Storage:
    """A flat storage: ``data`` is 1-D in the dtype's numpy type (bfloat16: raw uint16 bits)."""

    dtype: str
    data: np.ndarray


@dataclass(eq=False)
class Tensor:
    """A view of a storage, as ``torch._utils._rebuild_tensor_v2`` takes it (units: elements)."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False
    attrs: dict | None = None  # Python attributes (t.note = ...): torch then wraps the rebuild


@dataclass
class Parameter:
    tensor: Tensor
    requires_grad: bool = True


@dataclass
class Size:
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass
class Reduce:
    """``func(*args)`` at unpickling time (the REDUCE opcode)."""

    func: Global
    args: tuple


@dataclass
class Obj:
    """``cls.__new__(cls)`` then ``__dict__.update(state)`` (NEWOBJ + BUILD), e.g. a Namespace."""

    cls: Global
    state: dict = field(default_factory=dict)


@dataclass
class Build:
    """``target`` updated with ``state`` (the BUILD opcode): ``(None, {...})`` means setattr."""

    target: Any
    state: Any


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (as torch does)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_numpy(array: np.ndarray, dtype: str | None = None) -> Tensor:
    """A contiguous tensor with its own storage (for bfloat16 pass the uint16 bits)."""
    dtype = dtype or str(array.dtype)
    flat = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[dtype]).reshape(-1)
    shape = tuple(array.shape)
    stride = tuple(int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape)))
    return Tensor(Storage(dtype, flat), 0, shape, stride)


class _PickleWriter:
    """Protocol-2 opcodes for the object kinds above (globals memoized, like ``pickle`` does)."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.storages: dict[int, tuple[str, Storage]] = {}  # id -> (key, storage)
        self._memo: dict[Global, int] = {}

    def dump(self, obj: Any) -> bytes:
        self.save(obj)
        return bytes(self.out + b".")  # STOP

    def save(self, obj: Any) -> None:  # noqa: C901 - one branch per opcode family
        out = self.out
        if obj is None:
            out += b"N"
        elif obj is True or obj is False:
            out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, float):
            out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            out += b"X" + struct.pack("<I", len(data)) + data
        elif isinstance(obj, bytes):  # protocol 2 has no bytes opcode
            self.save(Reduce(Global("_codecs", "encode"), (obj.decode("latin-1"), "latin1")))
        elif isinstance(obj, tuple):
            self._tuple(obj)
        elif isinstance(obj, list):
            out += b"]"
            if obj:
                out += b"("
                for item in obj:
                    self.save(item)
                out += b"e"  # APPENDS
        elif isinstance(obj, OrderedDict):
            self.save(Reduce(Global("collections", "OrderedDict"), ()))
            self._setitems(obj)
        elif isinstance(obj, dict):
            out += b"}"
            self._setitems(obj)
        elif isinstance(obj, Global):
            self._global(obj)
        elif isinstance(obj, Reduce):
            self.save(obj.func)
            self.save(obj.args)
            out += b"R"
        elif isinstance(obj, Obj):
            self.save(obj.cls)
            out += b")\x81"  # EMPTY_TUPLE NEWOBJ
            self.save(obj.state)
            out += b"b"  # BUILD
        elif isinstance(obj, Build):
            self.save(obj.target)
            self.save(obj.state)
            out += b"b"  # BUILD
        elif isinstance(obj, Size):
            self.save(Reduce(Global("torch", "Size"), (tuple(obj.dims),)))
        elif isinstance(obj, Parameter):
            args = (obj.tensor, obj.requires_grad, OrderedDict())
            self.save(Reduce(Global("torch._utils", "_rebuild_parameter"), args))
        elif isinstance(obj, Tensor):
            self._tensor(obj)
        else:
            raise TypeError(f"torchfmt cannot pickle {type(obj).__name__}")

    def _int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data  # LONG1

    def _tuple(self, items: tuple) -> None:
        if not items:
            self.out += b")"
            return
        if len(items) > 3:
            self.out += b"("
        for item in items:
            self.save(item)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t")

    def _setitems(self, mapping: dict) -> None:
        if mapping:
            self.out += b"("
            for key, value in mapping.items():
                self.save(key)
                self.save(value)
            self.out += b"u"  # SETITEMS

    def _global(self, ref: Global) -> None:
        if ref in self._memo:
            self.out += b"h" + bytes([self._memo[ref]])  # BINGET
            return
        self.out += b"c" + f"{ref.module}\n{ref.name}\n".encode("ascii")
        if len(self._memo) < 256:
            self._memo[ref] = len(self._memo)
            self.out += b"q" + bytes([self._memo[ref]])  # BINPUT

    def _tensor(self, tensor: Tensor) -> None:
        rebuild = Global("torch._utils", "_rebuild_tensor_v2")
        if tensor.attrs is None:
            self.save(rebuild)
            self._tensor_args(tensor)
            self.out += b"R"
            return
        self.save(Global("torch._tensor", "_rebuild_from_type_v2"))
        self.out += b"("
        self.save(rebuild)
        self.save(Global("torch", "Tensor"))
        self._tensor_args(tensor)
        self.save(tensor.attrs)
        self.out += b"tR"

    def _tensor_args(self, tensor: Tensor) -> None:
        storage = tensor.storage
        key, _ = self.storages.setdefault(id(storage), (str(len(self.storages)), storage))
        self.out += b"("
        pid = ("storage", Global("torch", STORAGE_CLASSES[storage.dtype]), key, "cpu")
        self.save((*pid, int(storage.data.size)))
        self.out += b"Q"  # BINPERSID
        for item in (tensor.offset, tuple(tensor.shape), tuple(tensor.stride)):
            self.save(item)
        self.save(tensor.requires_grad)
        self.save(OrderedDict())  # backward hooks
        self.out += b"t"  # TUPLE


def dumps(obj: Any) -> tuple[bytes, list[tuple[str, Storage]]]:
    """The ``data.pkl`` bytes for ``obj`` and its storages, keyed in first-use order."""
    writer = _PickleWriter()
    data = writer.dump(obj)
    return data, list(writer.storages.values())


def save(
    obj: Any, path: str | Path, *, archive: str | None = None, byteorder: str = "little",
    compress: bool = False,
) -> Path:  # fmt: skip
    """Write ``obj`` as ``torch.save`` would; ``archive`` defaults to the file stem, as in torch."""
    path = Path(path)
    prefix = archive if archive is not None else path.stem
    data_pkl, storages = dumps(obj)
    members = [
        (f"{prefix}/data.pkl", data_pkl),
        (f"{prefix}/.format_version", b"1"),
        (f"{prefix}/.storage_alignment", b"64"),
        (f"{prefix}/byteorder", byteorder.encode("ascii")),
    ]
    order = "<" if byteorder == "little" else ">"
    for key, storage in storages:
        data = storage.data.astype(storage.data.dtype.newbyteorder(order))
        members.append((f"{prefix}/data/{key}", data.tobytes()))
    members.append((f"{prefix}/version", b"3\n"))
    members.append((f"{prefix}/.data/serialization_id", b"0123456789" * 4))
    write_zip(path, members, compress=compress)
    return path


def write_zip(path: Path, members: list[tuple[str, bytes]], *, compress: bool = False) -> None:
    """A zip laid out like torch's writer; ``compress=True`` deflates instead (Python's zipfile)."""
    if compress:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
        return
    out, central = bytearray(), bytearray()
    for name, data in members:
        raw_name, offset, crc = name.encode("utf-8"), len(out), zlib.crc32(data)
        start = offset + 30 + len(raw_name) + 4
        pad = -start % 64  # data starts on a 64-byte boundary, as in torch
        out += struct.pack("<4s5H3I2H", b"PK\x03\x04", 0, 0x0808, 0, 0, 0, 0, 0, 0,
                           len(raw_name), 4 + pad)  # fmt: skip
        out += raw_name + b"FB" + struct.pack("<H", pad) + b"Z" * pad + data
        out += struct.pack("<4s3I", b"PK\x07\x08", crc, len(data), len(data))
        sizes = (crc, len(data), len(data), len(raw_name))
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 0, 0, 0x0808, 0, 0, 0, *sizes,
                               0, 0, 0, 0, 0, offset)  # fmt: skip
        central += raw_name
    cd_offset, count = len(out), len(members)
    out += central
    eocd64 = len(out)
    out += struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, count, count,
                       len(central), cd_offset)  # fmt: skip
    out += struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1)
    out += struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, count, count, len(central), cd_offset, 0)
    Path(path).write_bytes(bytes(out))
