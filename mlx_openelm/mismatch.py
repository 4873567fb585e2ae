"""Comparing tensor names and shapes against what a model expects, listing every mismatch.

One reporter for the loader (an MLX folder against its config) and the converter (a source
checkpoint, after renaming, against the model built from its config): the caller raises once
with all of :func:`tensor_mismatches`' findings, so a user sees every problem in one go.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

__all__ = ["first_names", "group_names", "tensor_mismatches"]

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")
LIST_LIMIT = 12


def tensor_mismatches(
    expected: Mapping[str, Sequence[int]],
    found: Mapping[str, Sequence[int]],
    names: Callable[[Sequence[str]], str] | None = None,
) -> list[str]:
    """What is missing, unexpected or mis-shaped in ``found`` (name -> shape); empty if none.

    ``names`` writes a list of names (default :func:`group_names`, which folds per-layer ones;
    the loader lists them plainly with :func:`first_names`).
    """
    names = names or group_names
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [
        f"{k} (expected {tuple(expected[k])}, got {tuple(found[k])})"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {names(missing)}")
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {names(extra)}")
    if shapes:
        problems.append(f"shape mismatch: {first_names(shapes)}")
    return problems


def group_names(names: Sequence[str]) -> str:
    """All ``names``, per-layer ones folded: ``transformer.layers.{0-3,7}.attn.q_norm.weight``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for name in names:
        m = _LAYER.search(name)
        key = name if m is None else f"{name[: m.start(2)]}{{}}{name[m.end(2) :]}"
        groups[key].append(-1 if m is None else int(m.group(2)))
    parts = []
    for key, layers in groups.items():
        parts.append(key if layers == [-1] else key.replace("{}", "{" + _ranges(layers) + "}"))
    return ", ".join(parts)


def _ranges(values: list[int]) -> str:
    runs: list[list[int]] = []
    for v in sorted(set(values)):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def first_names(names: Sequence[str]) -> str:
    """The first ``LIST_LIMIT`` names and how many more."""
    more = f" (+{len(names) - LIST_LIMIT} more)" if len(names) > LIST_LIMIT else ""
    return ", ".join(names[:LIST_LIMIT]) + more
