"""Safe replacement of output folders: what ``--force`` may delete, no-replace renames, stale
temporaries of killed runs, and the one error for a full disk.

:func:`mlx_openelm.folder.atomic_output` (used by every writer of model and adapter folders)
builds on these.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import itertools
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import DiskFullError, OpenELMWarning, OutputExistsError, short
from .jsonio import read_json


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists.

    ``os.rename`` would silently replace an empty folder or a file at ``dst``; Linux's
    ``renameat2(RENAME_NOREPLACE)`` makes the check and the rename one step. Elsewhere (or on a
    filesystem without it) the check comes just before the rename.
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), 1) == 0:
            return
        errno_ = ctypes.get_errno()
        if errno_ == errno.EEXIST:
            raise FileExistsError(errno_, os.strerror(errno_), str(dst))
        if errno_ not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(errno_, os.strerror(errno_), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_AT_FDCWD = -100
_renameat2 = _load_renameat2()
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_full_error(e: OSError, path: str | Path, needed: int | None = None) -> DiskFullError:
    """The one-line error for a full disk while writing ``path`` (free space and need, if known)."""
    where = Path(e.filename) if e.filename else Path(path)
    probe = next((p for p in (where, *where.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    need = f", about {format_bytes(needed)} needed" if needed else ""
    return DiskFullError(
        f"no space left on the disk while writing {path} ({format_bytes(free)} free{need}); "
        "free some space or write to another disk (nothing partial was kept)"
    )


def format_bytes(n: int) -> str:
    """``1.5 GB``-style size (powers of 1000, like ``df -H``)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_replaceable(path: str | Path) -> None:
    """Refuse to let ``--force`` delete anything but a model or adapter folder of ours.

    Raises:
        OutputExistsError: ``path`` is the home folder, the current folder or one of its parents,
            a file, or a folder that holds neither an OpenELM ``config.json`` nor adapters.
    """
    path = Path(path).absolute()
    real, cwd = path.resolve(), Path.cwd().resolve()
    why = None
    if real == Path.home().resolve():
        why = "it is your home folder"
    elif real == cwd or real in cwd.parents:
        why = "it is the current folder or one of its parents"
    elif not path.is_dir() or path.is_symlink():
        why = "it is not a folder"
    elif any(path.iterdir()) and not _is_ours(path):
        why = f"it is not a model or adapter folder (it holds {_listing(path)})"
    if why:
        raise OutputExistsError(
            f"--force will not replace {path}: {why}; choose another output path"
        )


def _is_ours(folder: Path) -> bool:
    if any((folder / name).is_file() for name in _ADAPTER_MARKERS):
        return True
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return read_json(config, OutputExistsError).get("model_type") == "openelm"
    except OutputExistsError:
        return False


_ADAPTER_MARKERS = ("adapter_config.json", "adapters.safetensors", "state.json", "metrics.jsonl")


def _listing(folder: Path, limit: int = 5) -> str:
    names = sorted(p.name for p in itertools.islice(folder.iterdir(), 1000))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(short(n, 40) for n in names[:limit]) + more


def remove_stale_temporaries(output: Path, stem: str | None = None, suffix: str = "") -> list[Path]:
    """Remove temporaries beside ``output`` whose process is gone; warn for each.

    Folder writers leave ``.NAME.tmp-PID-*`` (``stem`` None), the file writer
    ``.STEM.tmp-PID-*SUFFIX``. A hard kill (``kill -9``, power loss) cannot clean up; the next
    write to the same output does. Those of a live process (another run writing the same output)
    are left alone.
    """
    stem = output.name if stem is None else stem
    removed = []
    for tmp in output.parent.glob(f".{glob.escape(stem)}.tmp-*{glob.escape(suffix)}"):
        pid = tmp.name[len(stem) + 6 :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)) or tmp.is_symlink():
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
        warnings.warn(
            f"removed {tmp}, left behind by an interrupted run (process {pid} is gone)",
            OpenELMWarning,
            stacklevel=2,
        )
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
