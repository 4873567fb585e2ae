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
import secrets
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import OutputExistsError, WeightsError, short
from .jsonio import parse_json
from .outputs import (
    DISK_FULL,
    check_replaceable,
    disk_full_error,
    remove_stale_temporaries,
    rename_noreplace,
)

MAX_SHARD_BYTES = 5 * 10**9
INDEX_NAME = "model.safetensors.index.json"

# The one safetensors dtype table: tag -> (dtype name, NumPy type of the stored bytes); bfloat16
# is moved as raw 16-bit patterns (NumPy has no bfloat16). The converter reads with it, this
# writer writes with it.
SAFETENSORS_DTYPES: dict[str, tuple[str, str]] = {
    "F64": ("float64", "<f8"), "F32": ("float32", "<f4"), "F16": ("float16", "<f2"),
    "BF16": ("bfloat16", "<u2"), "I64": ("int64", "<i8"), "I32": ("int32", "<i4"),
    "I16": ("int16", "<i2"), "I8": ("int8", "i1"), "U32": ("uint32", "<u4"),
    "U16": ("uint16", "<u2"), "U8": ("uint8", "u1"), "BOOL": ("bool", "?"),
}  # fmt: skip
_TAG_OF = {name: tag for tag, (name, _) in SAFETENSORS_DTYPES.items()}


def safetensors_tag(dtype: mx.Dtype) -> str:
    """The safetensors dtype tag of an MLX dtype (``mx.bfloat16`` -> ``"BF16"``)."""
    return _TAG_OF[str(dtype).rsplit(".", 1)[-1]]


_MAX_HEADER_BYTES = 100 * 2**20
_MAX_DIMS = 8


def _entry_problem(name: str, entry: Any) -> str | None:
    """Why one header entry is malformed, or None: checked before any arithmetic uses it."""
    if not isinstance(entry, dict):
        return f"{short(name, 80)} is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return f"{short(name, 80)} has no string 'dtype'"
    if not (
        isinstance(shape, list)
        and len(shape) <= _MAX_DIMS
        and all(type(d) is int and 0 <= d < 2**48 for d in shape)
    ):
        return f"{short(name, 80)} has 'shape' {short(shape, 60)}, not a list of sizes"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        return f"{short(name, 80)} has 'data_offsets' {short(offsets, 60)}, not [begin, end]"
    return None


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, its entries' types checked.

    Every tensor entry is an object with a string ``dtype``, a ``shape`` of at most 8
    non-negative ints and ``data_offsets`` ``[begin, end]`` with ``0 <= begin <= end``, so callers
    may do arithmetic on them; sizes against the file are checked by the caller.

    Raises:
        WeightsError: a truncated, non-JSON or malformed header, naming the file.
    """
    how = "download or convert it again"
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} is implausible")
            raw = f.read(n)
        if len(raw) != n:
            raise ValueError("file ends inside the header")
    except (OSError, struct.error, ValueError) as e:
        raise WeightsError(f"{path} is not a valid safetensors file ({e}); {how}") from None
    header = parse_json(
        raw, f"{path}", WeightsError, f"it is not a valid safetensors file; {how}", dict
    )
    problems = [
        problem
        for name, entry in header.items()
        if name != "__metadata__" and (problem := _entry_problem(name, entry))
    ]
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        problems.append("'__metadata__' is not an object")
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise WeightsError(f"{path} has a malformed header: {'; '.join(problems[:5])}{more}; {how}")
    return header


@contextlib.contextmanager
def atomic_output(
    output: str | Path, force: bool = False, needed: int | None = None
) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; rename it to ``output`` only on success.

    An exception or Ctrl-C removes the temporary folder and leaves any previous ``output`` alone;
    even a hard kill leaves no ``output`` behind (only a hidden ``.name.tmp-PID-*`` folder, which
    the next write to the same ``output`` removes once its process is gone, with a warning).
    ``force`` replaces only what was at ``output`` when writing began, and only a model or adapter
    folder: an ``output`` that appears meanwhile is never replaced.

    Raises:
        OutputExistsError: ``output`` exists and ``force`` is False, is not ours to replace, or
            appeared while writing.
        DiskFullError: the disk filled up (the temporary folder is removed); ``needed``, the
            expected size in bytes when known, is named in the message.
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
            raise disk_full_error(e, output, needed) from e
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


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write one file through ``write(tmp)``, a temporary path beside it, renamed over ``path``
    only once ``write`` returns: a crash never leaves a partial ``path``.

    ``tmp`` keeps ``path``'s suffix (``mx.save_safetensors`` and ``savefig`` go by it) and does
    not exist yet, so the file gets the umask's mode, as a plain write would.
    """
    path = Path(path)
    remove_stale_temporaries(path, path.stem, path.suffix)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in DISK_FULL:
            raise disk_full_error(e, path) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
            "dtype": safetensors_tag(a.dtype),
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
    check: Callable[[Path], None] | None = None,
    expected_bytes: int | None = None,
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
        check: called with the finished temporary folder before it is renamed to ``output``;
            an exception from it leaves no ``output`` (the quantization probe uses this).
        expected_bytes: about how large the weights will be, named if the disk fills up.

    Returns:
        Totals from :func:`write_safetensors`, plus ``"path"``.

    Raises:
        OutputExistsError: ``output`` exists and ``force`` is False.
        DiskFullError: the disk filled up (nothing is left behind).
    """
    with atomic_output(output, force=force, needed=expected_bytes) as tmp:
        totals = write_safetensors(tmp, tensors, max_shard_bytes, on_tensor)
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
        if generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if check is not None:
            check(tmp)
    return {**totals, "path": Path(output)}
