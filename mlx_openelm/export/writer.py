"""Writing one GGUF file with the ``gguf`` package: streamed, typed per tensor, atomic.

The ``gguf`` package (llama.cpp's own gguf-py) writes the header, the key/value metadata and the
tensor table; we declare every tensor first (name, shape, type), then hand it the data one tensor
at a time, so only one converted tensor is held at once. The file is written under a temporary
name beside the output and renamed only when complete: a full disk or Ctrl-C leaves no partial
GGUF behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import quant_shape_to_byte_shape, quantize

from ..errors import ExportError, OutputExistsError
from .options import OutType

Q = GGMLQuantizationType

QTYPES = {OutType.f32: Q.F32, OutType.f16: Q.F16, OutType.bf16: Q.BF16, OutType.q8_0: Q.Q8_0}
# general.file_type per weight type; Q4_0 is not an --outtype (ggml's Q4_0 rounds far more than
# MLX's 4-bit groups) but `bench --compare-llama-cpp` writes it to time llama.cpp's 4-bit path.
FILE_TYPES = {
    Q.F32: LlamaFileType.ALL_F32,
    Q.F16: LlamaFileType.MOSTLY_F16,
    Q.BF16: LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: LlamaFileType.MOSTLY_Q4_0,
}


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its GGUF name, shape (rows first, as numpy), type and data source."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    data: Callable[[], mx.array]

    @property
    def byte_shape(self) -> tuple[int, ...]:
        if self.qtype in (Q.F32, Q.F16):
            return self.shape
        return quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def nbytes(self) -> int:
        itemsize = {Q.F32: 4, Q.F16: 2}.get(self.qtype, 1)
        return math.prod(self.byte_shape) * itemsize


def weight_qtype(shape: Sequence[int], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """The GGUF type of a tensor: 1-D (norms) float32; quantized rows must fill whole blocks.

    A matrix whose rows do not split into Q8_0/Q4_0 blocks of 32 falls back to F16, as
    llama.cpp's converter does.
    """
    if len(shape) < 2:
        return Q.F32
    if qtype in (Q.Q8_0, Q.Q4_0) and shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


def encode(a: mx.array, qtype: GGMLQuantizationType) -> np.ndarray:
    """The bytes GGUF stores for ``a`` as ``qtype`` (a numpy array of the right layout)."""
    if qtype == Q.F32:
        return np.asarray(a.astype(mx.float32))
    if qtype == Q.F16:
        return np.asarray(a.astype(mx.float16))
    if qtype == Q.BF16:  # MLX rounds to nearest even, like llama.cpp; numpy has no bfloat16
        bits = np.asarray(a.astype(mx.bfloat16).view(mx.uint16))
        return bits.view(np.uint8).reshape(*a.shape[:-1], a.shape[-1] * 2)
    return quantize(np.asarray(a.astype(mx.float32)), qtype)


@contextlib.contextmanager
def atomic_file(output: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``output``; rename it to ``output`` only on success.

    Raises:
        OutputExistsError: ``output`` exists and ``force`` is not set.
        ExportError: the file cannot be written (a full disk, no permission).
    """
    if output.exists() and not force:
        raise OutputExistsError(
            f"output {output} already exists; choose another path or pass --force to replace it"
        )
    if output.is_dir():
        raise ExportError(f"output {output} is a folder; give a file name such as model.gguf")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
        os.close(fd)
    except OSError as e:
        raise ExportError(f"cannot write {output}: {e.strerror or e}") from e
    try:
        yield Path(tmp)
        os.replace(tmp, output)
    except OSError as e:
        raise ExportError(
            f"cannot write {output}: {e.strerror or e}; free some disk space or choose another "
            "path (nothing was written)"
        ) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_gguf(
    output: Path,
    arch: str,
    metadata: Callable[[GGUFWriter], None],
    tensors: Sequence[PlannedTensor],
    force: bool = False,
) -> int:
    """Write ``output`` (atomically) for ``arch``: ``metadata(writer)`` adds keys, then tensors.

    Returns:
        The size of the file in bytes.

    Raises:
        OutputExistsError, ExportError: as :func:`atomic_file`.
    """
    with atomic_file(output, force) as tmp:
        writer = GGUFWriter(tmp, arch)
        metadata(writer)
        for t in tensors:
            dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(t.qtype, np.uint8)
            writer.add_tensor_info(t.name, t.byte_shape, np.dtype(dtype), t.nbytes, t.qtype)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                writer.write_tensor_data(encode(t.data(), t.qtype))
        finally:
            writer.close()
        size = tmp.stat().st_size
    return size
