"""The wheel users install holds every module and data file of the source tree, and nothing else.

Builds the sdist, then the wheel from that sdist (``python -m build``'s default route), and compares
the wheel's file list with what the source tree says the package is: every ``.py`` under
``mlx_openelm/`` (``cli.py`` through its symlink to the root file), every ``.py`` under
``convert/`` as ``mlx_openelm/convert/``, every file under ``mlx_openelm/data/``. Installing and
running the wheel on each Python is ``.ci/run``'s job (``.ci/smoke.py``).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("build", reason="the packaging test needs the dev extra (build)")


def _source_files() -> set[str]:
    """Installed paths implied by the source tree (no hand list to keep in sync)."""
    skip = {"__pycache__"}
    files = {
        f"mlx_openelm/{p.relative_to(ROOT / 'mlx_openelm')}"
        for p in (ROOT / "mlx_openelm").rglob("*.py")
        if not skip & set(p.parts)
    }
    files |= {
        f"mlx_openelm/convert/{p.relative_to(ROOT / 'convert')}"
        for p in (ROOT / "convert").rglob("*.py")
        if not skip & set(p.parts)
    }
    files |= {
        f"mlx_openelm/{p.relative_to(ROOT / 'mlx_openelm')}"
        for p in (ROOT / "mlx_openelm" / "data").rglob("*")
        if p.is_file() and not skip & set(p.parts)
    }
    return files | {"mlx_openelm/py.typed"}


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--no-isolation", "-o", str(out), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return sdist, wheel


def test_wheel_holds_exactly_the_source_modules_and_data(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    package = {n for n in names if not n.split("/")[0].endswith(".dist-info")}
    expected = _source_files()
    assert expected - package == set(), "missing from the wheel"
    assert package - expected == set(), "in the wheel but not a package file of the source tree"
    assert {n.split("/")[0] for n in package} == {"mlx_openelm"}  # no top-level `convert`/`cli`


def test_wheel_cli_is_the_root_cli_and_the_console_script_points_at_it(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as zf:
        cli = zf.read("mlx_openelm/cli.py").decode()
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        entry_points = zf.read(info).decode()
        meta = zf.read(info.replace("entry_points.txt", "METADATA")).decode()
        license_files = [n for n in zf.namelist() if n.endswith("licenses/LICENSE")]
    assert cli == (ROOT / "cli.py").read_text()  # the file itself, not a dangling link
    assert "mlx-openelm = mlx_openelm.cli:main" in entry_points
    assert "Requires-Python: >=3.11" in meta
    assert "Classifier: Programming Language :: Python :: 3.13" in meta
    assert "License-Expression: MIT" in meta and license_files


def test_sdist_carries_the_root_cli_and_the_build_recipe(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        link = tf.getmember(f"{sdist.name.removesuffix('.tar.gz')}/mlx_openelm/cli.py")
    assert {"cli.py", "setup.py", "pyproject.toml", "LICENSE", "README.md"} <= names
    assert link.isfile()  # the symlink travels as the file's content, so the wheel build works
    assert {f"convert/{p.name}" for p in (ROOT / "convert").glob("*.py")} <= names
