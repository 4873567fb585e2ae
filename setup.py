"""Package discovery for mlx-openelm's two source trees (metadata lives in pyproject.toml).

Every package is found, none is listed by hand: ``mlx_openelm/`` and everything below it, and the
converter in ``convert/`` installed under our namespace as ``mlx_openelm.convert`` (a top-level
``convert`` package in site-packages would collide with other projects). ``package_dir`` maps the
prefix, so a new ``convert/<sub>/`` package installs as ``mlx_openelm.convert.<sub>``; this works
for wheels, sdists and editable installs alike. ``tests/test_packaging.py`` builds the wheel and
compares its file list with the source tree.
"""

from setuptools import find_packages, setup


def discover_packages() -> list[str]:
    """All library packages plus the converter's, renamed into the ``mlx_openelm`` namespace."""
    library = find_packages(include=["mlx_openelm", "mlx_openelm.*"])
    converter = find_packages(include=["convert", "convert.*"])
    return library + [f"mlx_openelm.{name}" for name in converter]


setup(packages=discover_packages(), package_dir={"mlx_openelm.convert": "convert"})
