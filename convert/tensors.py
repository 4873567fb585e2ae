"""Lazy tensors in checkpoint files, read one at a time.

Every source format ends up as a mapping ``name -> TensorRef``: something with a ``shape``, a
``dtype`` name, ``nbytes`` and ``to_mlx(dtype)``, which reads *that one tensor* from disk when
called. Safetensors headers are checked here against the file size (so a truncated download is
named as such), then each tensor is read on its own through MLX's lazy loader; PyTorch zip files
go through :mod:`.torch_reader`. Two wrappers build on any ``TensorRef``: :class:`RowSlice` (keep
the first rows) and :class:`AveragedTensor` (uniform mean of several).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import numpy as np

from mlx_openelm.errors import WeightsError, short
from mlx_openelm.folder import SAFETENSORS_DTYPES, safetensors_header
from mlx_openelm.jsonio import read_json

from .torch_reader import load_torch_state_dict

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class TensorRef(Protocol):
    """A tensor that is read from disk only when :meth:`to_mlx` is called."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int: ...

    def to_mlx(self, dtype: mx.Dtype | None = None) -> mx.array: ...


class SafetensorsTensor:
    """One tensor of a safetensors file whose header :func:`open_safetensors` has checked."""

    __slots__ = ("path", "name", "start", "shape", "dtype", "_itemsize")

    def __init__(self, path: Path, name: str, start: int, shape: tuple[int, ...], tag: str) -> None:
        self.path, self.name, self.start, self.shape = path, name, start, shape
        self.dtype = SAFETENSORS_DTYPES[tag][0]
        self._itemsize = np.dtype(SAFETENSORS_DTYPES[tag][1]).itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self._itemsize

    def __repr__(self) -> str:
        return f"SafetensorsTensor({self.path.name}:{self.name}, {self.shape}, {self.dtype})"

    def to_mlx(self, dtype: mx.Dtype | None = None) -> mx.array:
        # mx.load is lazy: evaluating one entry reads just that tensor's bytes, once, straight
        # into MLX memory (bfloat16 included); the other entries are never read.
        try:
            array = mx.load(str(self.path))[self.name]
        except (RuntimeError, ValueError, KeyError) as e:
            raise WeightsError(
                f"cannot read tensor {self.name} from {self.path} ({e}); the file changed or is "
                "damaged, download or save it again"
            ) from e
        return array if dtype is None or array.dtype == dtype else array.astype(dtype)


def open_safetensors(path: Path) -> dict[str, SafetensorsTensor]:
    """The tensors of one safetensors file, after checking its header against the file size.

    Raises:
        WeightsError: a truncated or corrupt header, an unknown dtype, a shape that disagrees
            with the byte range, or data past the end of the file (all problems listed).
    """
    header = safetensors_header(path)
    data_start = 8 + _header_length(path)
    size = os.path.getsize(path)
    tensors: dict[str, SafetensorsTensor] = {}
    problems: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tag, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        label = short(name, 80)
        if tag not in SAFETENSORS_DTYPES:
            problems.append(f"{label} has unsupported dtype {short(tag, 20)}")
            continue
        ref = SafetensorsTensor(path, name, data_start + begin, shape, tag)
        span, need = end - begin, ref.nbytes
        if span != need:
            problems.append(f"{label} spans {span} bytes but shape {shape} needs {need}")
        elif ref.start + span > size:
            problems.append(f"{label} ends at byte {ref.start + span} but the file has {size}")
        spans.append((begin, end, name))
        tensors[name] = ref
    problems += _overlaps(spans)
    if problems:
        more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise WeightsError(
            f"{path} is damaged: " + "; ".join(problems[:8]) + more + ". The file is truncated "
            "or corrupt; download or save it again"
        )
    return tensors


def _header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def _overlaps(spans: list[tuple[int, int, str]]) -> list[str]:
    """Tensors whose byte ranges overlap (a crafted header could alias one tensor's bytes)."""
    problems = []
    last_end, last_name = 0, ""
    for begin, end, name in sorted(spans):
        if begin < last_end and end > begin:
            problems.append(f"{short(name, 80)} overlaps {short(last_name, 80)}")
        if end > last_end:
            last_end, last_name = end, name
    return problems


def open_weight_files(files: Sequence[Path]) -> dict[str, TensorRef]:
    """Merge the tensors of several weight files (safetensors or torch), in file order.

    Raises:
        WeightsError: unreadable files, or the same tensor name in two files.
        UnsafePickleError: a torch pickle asking for a forbidden global.
    """
    merged: dict[str, TensorRef] = {}
    seen_in: dict[str, Path] = {}
    for path in files:
        if path.suffix == ".safetensors":
            part: Mapping[str, TensorRef] = open_safetensors(path)
        else:
            part = load_torch_state_dict(path)
        dupes = sorted(set(part) & set(merged))
        if dupes:
            raise WeightsError(
                f"tensor(s) {', '.join(dupes[:8])} appear in both {seen_in[dupes[0]]} and {path}; "
                "pass each shard once (or the folder with its index file)"
            )
        merged.update(part)
        seen_in.update(dict.fromkeys(part, path))
    return merged


def read_index(index: Path) -> list[Path]:
    """The shard files named by a ``*.index.json`` (checked to exist), in first-use order.

    Raises:
        WeightsError: unreadable index or missing shard files (all named).
    """
    how = "download it again or remove it"
    weight_map = read_json(index, WeightsError, how).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and v and "/" not in v and v not in (".", "..")
        for v in weight_map.values()
    ):
        raise WeightsError(f"{index}: 'weight_map' must map tensor names to file names; {how}")
    names = list(dict.fromkeys(weight_map.values()))
    files = [index.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise WeightsError(
            f"{index} lists shard(s) that are not in {index.parent}: {', '.join(missing)}; "
            "download the missing files"
        )
    return files


class RowSlice:
    """The first ``rows`` rows of another tensor (e.g. an embedding without its padding rows)."""

    def __init__(self, ref: TensorRef, rows: int) -> None:
        self.ref, self.rows = ref, rows
        self.shape = (rows, *ref.shape[1:])
        self.dtype = ref.dtype

    @property
    def nbytes(self) -> int:
        return self.ref.nbytes // self.ref.shape[0] * self.rows

    def to_mlx(self, dtype: mx.Dtype | None = None) -> mx.array:
        return self.ref.to_mlx(dtype)[: self.rows]


class AveragedTensor:
    """The uniform mean of same-shaped tensors, accumulated in float32 one input at a time."""

    def __init__(self, refs: Sequence[TensorRef]) -> None:
        self.refs = list(refs)
        self.shape = tuple(self.refs[0].shape)
        self.dtype = "float32"

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.refs)

    def to_mlx(self, dtype: mx.Dtype | None = None) -> mx.array:
        total = self.refs[0].to_mlx(mx.float32)
        for ref in self.refs[1:]:
            total = total + ref.to_mlx(mx.float32)
            mx.eval(total)  # drop each input as soon as it is added
        mean = total / len(self.refs)
        return mean if dtype is None else mean.astype(dtype)
