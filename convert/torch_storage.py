"""The storage side of the torch checkpoint reader: the zip archive and its lazy tensors.

``torch.save`` (torch >= 1.6) writes a zip archive whose tensor storages are raw little-endian
members ``<prefix>/data/<key>``. :class:`Archive` reads the member table and byte ranges of those
members; each tensor becomes a :class:`LazyTensor` that remembers its member, byte offset, shape
and strides and reads just those bytes when asked. While the archive is open, reads share its one
file handle; after it is closed each read reopens the file for that one read, and a file changed
on disk since it was opened is reported instead of read.

The pickle that names these storages is read by :mod:`.torch_pickle`; the public entry points are
in :mod:`.torch_reader`.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

from mlx_openelm.errors import WeightsError

__all__ = ["LazyTensor"]

# Supported tensor dtypes -> little-endian numpy storage dtype; bfloat16 is kept as its raw bits.
NUMPY_DTYPES = {
    "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "float64": "<f8", "int64": "<i8",
    "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
}  # fmt: skip
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length


class Archive:
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

    def read_member(self, name: str, limit: int = 256 * 2**20) -> bytes:
        """The whole (small) member ``name``, CRC-checked, refused past ``limit`` bytes.

        A compressed member may claim or inflate to far more than the archive holds (a 141-byte
        deflate bomb); it is read in chunks and refused once past ``limit`` or 50 times its
        compressed size (stored members: their size), whichever is smaller.
        """
        info = self.infos[name]
        bound = min(limit, max(info.compress_size * 50, 2**20))
        with self._lock:
            try:
                if info.file_size > bound:
                    raise ValueError(f"it unpacks to {info.file_size} bytes")
                with self._zip.open(info) as member:
                    data = member.read(bound + 1)
                if len(data) > bound:
                    raise ValueError(f"it unpacks to more than {bound} bytes")
                return data
            except ValueError as exc:
                raise WeightsError(
                    f"{self.path}: member {name} is implausibly large ({exc}, from "
                    f"{info.compress_size} compressed); the file is corrupt or hostile."
                ) from None
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
class StorageRef:
    archive: Archive
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
        self, storage: StorageRef, dtype: str, offset: int, shape: tuple, stride: tuple
    ) -> None:
        self._storage, self.dtype, self._offset, self.shape, self._stride = (
            storage, dtype, offset, shape, stride
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes once read (contiguous), as in torch."""
        return math.prod(self.shape) * np.dtype(NUMPY_DTYPES[self.dtype]).itemsize

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype}, member={self._storage.member})"

    def raw(self) -> np.ndarray:
        """The tensor as a contiguous numpy array; bfloat16 comes back as its raw uint16 bits."""
        dtype = np.dtype(NUMPY_DTYPES[self.dtype]).newbyteorder(self._storage.archive.byteorder)
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


def make_tensor(storage: StorageRef, dtype: str, offset: int, size: Any, stride: Any) -> LazyTensor:
    if dtype not in NUMPY_DTYPES:
        raise WeightsError(
            f"{storage.archive.path}: tensor in {storage.member} has dtype {dtype}, which this "
            f"reader does not support ({', '.join(NUMPY_DTYPES)}). Cast it in torch and re-save."
        )
    shape, strides = tuple(size), tuple(stride)
    values = (offset, *shape, *strides)
    if len(shape) != len(strides) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise WeightsError(f"{storage.archive.path}: bad tensor layout in {storage.member}.")
    itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
    span = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    if (offset + span) * itemsize > storage.nbytes:
        raise WeightsError(
            f"{storage.archive.path}: a tensor of shape {shape} reads past the end of "
            f"{storage.member} ({storage.nbytes} bytes); the file is truncated or corrupt."
        )
    return LazyTensor(storage, dtype, offset, shape, strides)
