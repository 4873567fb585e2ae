"""``mlx-openelm doctor``: the facts a bug report needs, and the Linux CPU BLAS check.

The Linux ``mlx[cpu]`` wheel links the reference (netlib) BLAS it bundles in ``mlx_cpu.libs``.
Every float matmul goes through ``cblas_sgemm``, and the reference one is unblocked,
single-threaded code: preloading OpenBLAS (Debian/Ubuntu: ``libopenblas0-pthread``) makes fp32
prefill and LoRA training many times faster with the same results. Symbols of an
``LD_PRELOAD``-ed library come first in the dynamic linker's global scope, ahead of the
libraries ``libmlx.so`` brought along, so MLX binds to the preloaded BLAS. Which one it got is
visible from inside the process: the library that ``dlsym(RTLD_DEFAULT, "cblas_sgemm")``
resolves to, or, when nothing global provides it, the BLAS mapped next to MLX in
``/proc/self/maps``.

OpenBLAS picks its kernels from the CPU model. A release older than the CPU does not know it and
falls back to generic SSE3 ("Prescott") kernels, several times slower than its AVX2/AVX-512 ones;
``OPENBLAS_CORETYPE`` overrides the choice, and is suggested only when ``/proc/cpuinfo`` shows the
instructions the named kernels need.

``LD_PRELOAD`` only acts when a process starts, so the automatic fix (:func:`reexec_with_openblas`,
the CLI's ``--fast-blas``) restarts the same command line with it set.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlx.core as mx

OPENBLAS_PACKAGE = "libopenblas0-pthread"
_MULTIARCH = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
_REEXEC_GUARD = "MLX_OPENELM_FAST_BLAS_REEXEC"
# OpenBLAS's fallbacks for CPUs it does not know: SSE-era kernels.
_GENERIC_CORES = {"prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "generic"}
_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
_BLAS_NAME = re.compile(r"(lib(open)?blas|libmkl_rt|libblis|libcblas)[^/]*\.so", re.IGNORECASE)


def openblas_path() -> Path:
    """Where Debian/Ubuntu's ``libopenblas0-pthread`` puts its BLAS for this machine."""
    arch = _MULTIARCH.get(platform.machine(), f"{platform.machine()}-linux-gnu")
    return Path(f"/usr/lib/{arch}/openblas-pthread/libblas.so.3")


def fast_blas_commands(installed: bool | None = None, coretype: str | None = None) -> list[str]:
    """The shell lines that make MLX use OpenBLAS (the install line only when needed)."""
    path = openblas_path()
    installed = path.is_file() if installed is None else installed
    lines = [] if installed else [f"sudo apt-get install {OPENBLAS_PACKAGE}"]
    lines.append(f"export LD_PRELOAD={path}")
    if coretype:
        lines.append(f"export OPENBLAS_CORETYPE={coretype}")
    return lines


def cpu_flags() -> set[str]:
    """Instruction-set flags of the first CPU in ``/proc/cpuinfo`` (empty when unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def coretype_hint(corename: str | None, flags: set[str]) -> str | None:
    """An ``OPENBLAS_CORETYPE`` for a CPU OpenBLAS did not recognise, if its flags allow one."""
    if corename is None or corename.lower() not in _GENERIC_CORES:
        return None
    if _AVX512 <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def fast_coretype(core: str | None = None) -> str | None:
    """The ``OPENBLAS_CORETYPE`` to set here, or None (already set, not needed, not possible).

    ``core`` is OpenBLAS's current choice; by default the system OpenBLAS is asked.
    """
    if os.environ.get("OPENBLAS_CORETYPE"):
        return None
    return coretype_hint(core or openblas_corename(), cpu_flags())


def openblas_corename(library: str | Path | None = None) -> str | None:
    """The kernel set OpenBLAS chose (or would choose) in this process, e.g. ``"Haswell"``."""
    try:
        get = ctypes.CDLL(str(library or openblas_path())).openblas_get_corename
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_char_p
    return get().decode(errors="replace").strip()


@dataclass(frozen=True, kw_only=True)
class BlasInfo:
    kind: str  # "openblas", "reference", "mkl", "blis", "accelerate", "unknown"
    library: str | None  # the file MLX's cblas_sgemm resolves to
    config: str | None  # OpenBLAS's own description (version, target, threads)
    core: str | None  # OpenBLAS's kernel set ("Haswell", "SkylakeX", "Prescott" = generic)
    loaded: list[str]  # every BLAS-like library mapped into this process


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _global_symbol_file(name: str) -> str | None:
    """The file that defines ``name`` in the global symbol scope, or None."""
    try:
        address = ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p)
    except AttributeError:
        return None
    info = _DlInfo()
    libc = ctypes.CDLL(None)
    if not libc.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _mapped_blas(maps: str) -> list[str]:
    """BLAS-like shared libraries in a ``/proc/PID/maps`` text, in load order."""
    found: list[str] = []
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if path.startswith("/") and _BLAS_NAME.search(Path(path).name) and path not in found:
            found.append(path)
    return found


def _openblas_config(library: str) -> str | None:
    try:
        get_config = ctypes.CDLL(library).openblas_get_config
    except (OSError, AttributeError):
        return None
    get_config.restype = ctypes.c_char_p
    return get_config().decode(errors="replace").strip()


def classify_blas(library: str | None) -> tuple[str, str | None]:
    """``(kind, openblas_config)`` of a BLAS library file."""
    if library is None:
        return "unknown", None
    config = _openblas_config(library)
    name = library.lower()
    if config is not None:
        return "openblas", config
    if "mkl" in name:
        return "mkl", None
    if "blis" in name:
        return "blis", None
    if _BLAS_NAME.search(Path(name).name):
        return "reference", None  # netlib: the wheel's bundled copy or a distro's libblas3
    return "unknown", None


def blas_info() -> BlasInfo:
    """Which BLAS MLX's CPU matmuls run on in this process (after running one)."""
    if sys.platform == "darwin":
        return BlasInfo(kind="accelerate", library=None, config=None, core=None, loaded=[])
    a = mx.ones((64, 64), dtype=mx.float32)
    mx.eval(mx.matmul(a, a, stream=mx.cpu))  # make sure the BLAS is loaded and bound
    try:
        loaded = _mapped_blas(Path("/proc/self/maps").read_text())
    except OSError:
        loaded = []
    library = _global_symbol_file("cblas_sgemm")
    if library is None:  # nothing global: MLX uses the BLAS it brought (its own dependency)
        bundled = [p for p in loaded if "mlx" in p]
        library = bundled[0] if bundled else (loaded[0] if loaded else None)
    kind, config = classify_blas(library)
    core = openblas_corename(library) if kind == "openblas" else None
    return BlasInfo(kind=kind, library=library, config=config, core=core, loaded=loaded)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _backend() -> str:
    if mx.metal.is_available():
        return "Metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "CUDA"
    return "CPU"


def _memory() -> dict[str, Any]:
    info = dict(mx.device_info()) if hasattr(mx, "device_info") else {}
    if "memory_size" in info:
        return {"device_memory_gb": info["memory_size"] / 1e9, "device": info}
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    return {"system_memory_gb": ram / 1e9 if ram else None, "device": info}


def report() -> dict[str, Any]:
    """Everything ``doctor`` shows, as a JSON-ready dict."""
    from . import __version__

    out: dict[str, Any] = {
        "mlx-openelm": __version__,
        "mlx": mx.__version__,
        "mlx-lm": _version("mlx-lm"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": _backend(),
        "default_device": str(mx.default_device()),
        **_memory(),
        "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }
    if sys.platform.startswith("linux"):
        blas = blas_info()
        out["blas"] = asdict(blas)
        coretype = fast_coretype(blas.core if blas.kind == "openblas" else None)
        if blas.kind == "reference":
            out["fix_reason"] = (
                "MLX is using the slow reference BLAS bundled with the mlx[cpu] wheel; OpenBLAS "
                "makes fp32 prefill and LoRA training many times faster. Run:"
            )
        elif coretype:
            out["fix_reason"] = (
                f"OpenBLAS does not recognise this CPU and runs its generic {blas.core} kernels; "
                f"the CPU supports its several times faster {coretype} kernels. Run:"
            )
        if "fix_reason" in out:
            out["fix"] = fast_blas_commands(coretype=coretype)
    return out


def format_report(r: Mapping[str, Any]) -> str:
    """The report as plain aligned text, ready to paste into an issue."""
    W = 17  # noqa: N806 - label column width
    lines = [f"{key:<{W}} {r[key]}" for key in ("mlx-openelm", "mlx", "mlx-lm", "python", "os")]
    lines.append(f"{'backend':<{W}} {r['backend']} (default device {r['default_device']})")
    name = r["device"].get("device_name") or r["machine"]
    if r.get("device_memory_gb") is not None:
        lines.append(f"{'device':<{W}} {name}, {r['device_memory_gb']:.1f} GB")
    else:
        ram = r.get("system_memory_gb")
        ram_text = f"{ram:.1f} GB system RAM" if ram else "memory unknown"
        lines.append(f"{'device':<{W}} {name}, {r['cpu_count']} CPUs, {ram_text}")
    blas = r.get("blas")
    if blas is not None:
        core = f" ({blas['core']} kernels)" if blas["core"] else ""
        lines.append(f"{'BLAS':<{W}} {blas['kind']}{core}: {blas['library']}")
        if blas["config"]:
            lines.append(f"{'':<{W}} {blas['config']}")
        lines.append(f"{'LD_PRELOAD':<{W}} {r['LD_PRELOAD'] or '(not set)'}")
        if r["OPENBLAS_CORETYPE"]:
            lines.append(f"{'OPENBLAS_CORETYPE':<{W}} {r['OPENBLAS_CORETYPE']}")
    if r.get("fix"):
        lines += ["", r["fix_reason"], *(f"    {c}" for c in r["fix"])]
        lines.append("or pass --fast-blas (eval, bench, doctor) to restart a command that way.")
    return "\n".join(lines)


def reexec_with_openblas(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    execve: Callable[[str, Sequence[str], Mapping[str, str]], Any] = os.execve,
    flags: set[str] | None = None,
) -> str | None:
    """Restart this process with OpenBLAS preloaded; return why not when it cannot.

    Also sets ``OPENBLAS_CORETYPE`` when OpenBLAS would run generic kernels on a CPU with
    AVX2/AVX-512 (unless the variable is set already). ``flags`` defaults to :func:`cpu_flags`.

    Safe by construction: it only acts on Linux, when the OpenBLAS file exists, when ``argv``
    (the original command line, ``sys.orig_argv``) asked for it with ``--fast-blas`` (so an
    embedding program or test runner is never replaced), and at most once (a guard variable stops
    a loop if the loader ignored the preload, as it does for set-uid programs).

    Returns:
        None when there is nothing to do (OpenBLAS already preloaded, with good kernels);
        otherwise a one-line reason why the restart did not happen. On success it does not return.
    """
    env = dict(os.environ if env is None else env)
    flags = cpu_flags() if flags is None else flags
    path = str(openblas_path())
    preloads = env.get("LD_PRELOAD", "").replace(":", " ").split()
    coretype = None if env.get("OPENBLAS_CORETYPE") else coretype_hint(openblas_corename(), flags)
    if path in preloads and not coretype:
        return None
    if not sys.platform.startswith("linux"):
        return "--fast-blas only matters on Linux (other platforms ship a fast BLAS)"
    if not Path(path).is_file():
        return f"--fast-blas needs OpenBLAS: {' && '.join(fast_blas_commands(installed=False))}"
    if "--fast-blas" not in argv[1:]:
        return "--fast-blas restarts only a real command line; preload OpenBLAS yourself here"
    if env.get(_REEXEC_GUARD):
        return f"the restart with LD_PRELOAD={path} did not take effect; set it yourself"
    if path not in preloads:
        env["LD_PRELOAD"] = " ".join([path, *preloads])
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    env[_REEXEC_GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, list(argv), env)
    return "the restart failed"  # only reached when a test replaces execve
