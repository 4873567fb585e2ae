"""Writing MLX model folders: atomically, tensor by tensor, sharded at 5 GB.

One writer serves ``convert`` and ``fuse``. A folder is ``config.json`` (HF field names,
``model_type: "openelm"``, ``quantization`` when quantized), ``model.safetensors`` (or shards plus
``model.safetensors.index.json``), ``tokenizer.model`` + ``tokenizer_config.json`` and optionally
``generation_config.json``.

Tensors are streamed: each one is evaluated, its bytes written into the shard file behind a
reserved header area, and dropped, so peak memory stays near the largest single tensor rather
than the model size. The safetensors header (which must come first) is filled in once all shapes
are known.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import OutputExistsError
from .outputs import (
    DISK_FULL,
    check_replaceable,
    disk_full_error,
    remove_stale_temporaries,
    rename_noreplace,
)

MAX_SHARD_BYTES = 5 * 10**9
INDEX_NAME = "model.safetensors.index.json"

_ST_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.int64: "I64",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.bool_: "BOOL",
}


@contextlib.contextmanager
def atomic_output(output: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; rename it to ``output`` only on success.

    An exception or Ctrl-C removes the temporary folder and leaves any previous ``output`` alone;
    even a hard kill leaves no ``output`` behind (only a hidden ``.name.tmp-PID-*`` folder, which
    the next write to the same ``output`` removes once its process is gone, with a warning).
    ``force`` replaces only what was at ``output`` when writing began, and only a model or adapter
    folder: an ``output`` that appears meanwhile is never replaced.

    Raises:
        OutputExistsError: ``output`` exists and ``force`` is False, is not ours to replace, or
            appeared while writing.
        DiskFullError: the disk filled up (the temporary folder is removed).
    """
    output = Path(output).absolute()
    before = _identity(output)
    if before is not None:
        if not force:
            raise OutputExistsError(
                f"output {output} already exists; choose another path or pass --force to replace it"
            )
        check_replaceable(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
    try:
        yield tmp
        _move_into_place(tmp, output, before)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in DISK_FULL:
            raise disk_full_error(e, output) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells the folder at ``path`` from another one made there later (inodes are reused)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _move_into_place(tmp: Path, output: Path, before: tuple[int, int, int] | None) -> None:
    """Rename ``tmp`` to ``output``, replacing only the ``output`` seen at the start."""
    appeared = OutputExistsError(
        f"output {output} appeared while it was being written; it was left alone and the new "
        "result discarded: remove it or choose another path, then run again"
    )
    old = None
    if before is not None:
        if _identity(output) != before:
            raise appeared
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    try:
        rename_noreplace(tmp, output)
    except FileExistsError:
        if old is not None:
            with contextlib.suppress(OSError):
                rename_noreplace(old, output.with_name(f"{output.name}.replaced-{os.getpid()}"))
        raise appeared from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary name in the same folder, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _array_bytes(a: mx.array) -> bytes:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: move the raw 16-bit patterns
        a = a.view(mx.uint16)
    return np.asarray(a).tobytes(order="C")


# Room left for the JSON header in front of the data, so each tensor's bytes are written once,
# straight into the final file. Whitespace padding of the header is allowed by the format; 256 KiB
# holds ~2000 tensor entries (a quantized 3B model has ~700). A larger header falls back to a copy.
_HEADER_RESERVE = 256 * 1024


class _Shard:
    def __init__(self, folder: Path, index: int):
        self.path = folder / f".shard-{index}.safetensors"
        self.file = open(self.path, "wb")
        self.file.seek(8 + _HEADER_RESERVE)
        self.header: dict[str, Any] = {}
        self.size = 0

    def add(self, name: str, a: mx.array) -> int:
        data = _array_bytes(a)
        self.header[name] = {
            "dtype": _ST_DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [self.size, self.size + len(data)],
        }
        self.file.write(data)
        self.size += len(data)
        return len(data)

    def finish(self, path: Path) -> None:
        header = json.dumps({"__metadata__": {"format": "mlx"}, **self.header}).encode()
        if len(header) <= _HEADER_RESERVE:
            self.file.seek(0)
            self.file.write(_HEADER_RESERVE.to_bytes(8, "little"))
            self.file.write(header + b" " * (_HEADER_RESERVE - len(header)))
            self.file.close()
            self.path.rename(path)
            return
        self.file.close()
        header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned
        with open(path, "wb") as out, open(self.path, "rb") as body:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            body.seek(8 + _HEADER_RESERVE)
            shutil.copyfileobj(body, out, 16 * 2**20)
        self.path.unlink()


def write_safetensors(
    folder: Path,
    tensors: Iterable[tuple[str, mx.array]],
    max_shard_bytes: int = MAX_SHARD_BYTES,
    on_tensor: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Stream ``(name, array)`` pairs into ``model.safetensors`` or ≤ ``max_shard_bytes`` shards.

    Returns:
        Totals: ``{"total_size": bytes, "total_parameters": n, "files": [...]}``.
    """
    shards = [_Shard(folder, 0)]
    weight_map: dict[str, int] = {}
    total_params = 0
    for name, a in tensors:
        mx.eval(a)
        if shards[-1].size and shards[-1].size + a.nbytes > max_shard_bytes:
            shards.append(_Shard(folder, len(shards)))
        nbytes = shards[-1].add(name, a)
        weight_map[name] = len(shards) - 1
        total_params += a.size
        if on_tensor is not None:
            on_tensor(name, nbytes)
        del a
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    for shard, fname in zip(shards, names):
        shard.finish(folder / fname)
    total_size = sum(s.size for s in shards)
    if n > 1:
        index = {
            "metadata": {"total_size": total_size},
            "weight_map": {k: names[v] for k, v in sorted(weight_map.items())},
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return {"total_size": total_size, "total_parameters": total_params, "files": names}


def write_model_folder(
    output: str | Path,
    config: dict[str, Any],
    tensors: Iterable[tuple[str, mx.array]],
    tokenizer: Any | None = None,
    generation_config: dict[str, Any] | None = None,
    force: bool = False,
    on_tensor: Callable[[str, int], None] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict[str, Any]:
    """Write a complete MLX model folder atomically.

    Args:
        output: the folder to create.
        config: the ``config.json`` content (HF field names); not modified.
        tensors: ``(name, array)`` pairs, consumed lazily one at a time.
        tokenizer: an ``mlx_openelm.tokenizer.Tokenizer`` saved into the folder (``tokenizer.model``
            and ``tokenizer_config.json`` with its chat template), or None.
        generation_config: written as ``generation_config.json`` when given.
        force: replace an existing ``output``.
        on_tensor: progress callback ``(name, nbytes)`` after each tensor is written.

    Returns:
        Totals from :func:`write_safetensors`, plus ``"path"``.

    Raises:
        OutputExistsError: ``output`` exists and ``force`` is False.
    """
    with atomic_output(output, force=force) as tmp:
        totals = write_safetensors(tmp, tensors, max_shard_bytes, on_tensor)
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
        if generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return {**totals, "path": Path(output)}
