"""The one way this project reads JSON and JSONL: every failure is a project error with file:line.

``json.loads`` fails in more ways than ``JSONDecodeError``: ``ValueError`` for a number of more
than 4300 digits, ``RecursionError`` for deep nesting, ``UnicodeDecodeError`` for bytes that are
not UTF-8; and it *accepts* lone surrogates (``"\\ud800"``), which later crash the tokenizer or
any UTF-8 encoder far from the file. :func:`parse_json`, :func:`read_json` and
:func:`read_jsonl` turn all of these into the error class the caller names (``ConfigError``,
``DataError``...), saying which file, which line and how to fix it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import OpenELMError, short

# A ``\\uD800``-``\\uDFFF`` escape: only then can a parsed string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def lone_surrogate_path(value: Any) -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate (``messages[0].content``,
    ``""`` for the value itself), or None. Python accepts ``"\\ud800"``; UTF-8 cannot hold it."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                where = f"{path}.{key}" if path else str(key)
                stack += [(key, where), (child, where)]
        elif isinstance(item, list):
            stack += [(child, f"{path}[{i}]") for i, child in enumerate(item)]
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, json.JSONDecodeError):
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
        return f"malformed JSON ({e.msg} at {at})"
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    if isinstance(e, UnicodeError):
        return f"not valid UTF-8 ({getattr(e, 'reason', e)})"
    return f"bad JSON value ({short(str(e), 120)})"


def parse_json(
    text: str | bytes,
    where: str,
    error: type[OpenELMError],
    how: str = "fix or re-create the file",
    expect: type | None = None,
) -> Any:
    """Parse one JSON document; any failure becomes ``error`` naming ``where``.

    Args:
        text: the JSON text (bytes are decoded as UTF-8).
        where: ``file`` or ``file:line``, put in front of the message.
        error: the project error class to raise.
        how: how to fix it, appended to the message.
        expect: the type the top-level value must have (e.g. ``dict``), or None.

    Raises:
        ``error``: invalid UTF-8 or JSON, a huge number, deep nesting, a lone surrogate, or a
            top-level value of the wrong type.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text)
    except (ValueError, RecursionError, UnicodeError) as e:
        raise error(f"{where}: {_reason(e)}; {how}") from None
    path = lone_surrogate_path(value) if _SURROGATE_ESCAPE.search(text) else None
    if path is not None:
        at = f" at {short(path, 80)}" if path else ""
        bad = error(f"{where}: a string{at} holds a lone UTF-16 surrogate (\\ud800-\\udfff); {how}")
        bad.json_path = path  # the server names the field as its 400's ``param``
        raise bad
    if expect is not None and not isinstance(value, expect):
        raise error(
            f"{where}: expected a JSON {_TYPE_NAMES.get(expect, expect.__name__)}, "
            f"got {_json_type(value)}; {how}"
        )
    return value


_TYPE_NAMES = {dict: "object", list: "array", str: "string"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _read_bytes(path: Path, error: type[OpenELMError], how: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}; {how}") from None


def read_json(
    path: str | Path,
    error: type[OpenELMError],
    how: str = "fix or re-create the file",
    expect: type | None = dict,
) -> Any:
    """Read a JSON file (by default it must hold an object); see :func:`parse_json`.

    Raises:
        ``error``: the file is unreadable or its content is not what :func:`parse_json` accepts.
    """
    path = Path(path)
    return parse_json(_read_bytes(path, error, how), str(path), error, how, expect)


def read_jsonl(
    path: str | Path,
    error: type[OpenELMError],
    how: str = "fix or delete the line",
    expect: type | None = dict,
    skip_bad: bool = False,
    raw: bytes | None = None,
) -> list[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSONL file.

    Lines are split on bytes (``\\n``, ``\\r``), never on the Unicode line separators that
    ``str.splitlines`` also breaks at and that JSON strings may hold.

    Args:
        skip_bad: drop lines that do not parse instead of raising (a log whose last line was
            torn by a crash).
        raw: the file's bytes, when the caller has read them already (to hash them).

    Raises:
        ``error``: the file is unreadable or a line is not valid (see :func:`parse_json`),
            naming ``file:line``.
    """
    path = Path(path)
    raw = _read_bytes(path, error, how) if raw is None else raw
    records = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((number, parse_json(line, f"{path}:{number}", error, how, expect)))
        except OpenELMError:
            if not skip_bad:
                raise
    return records


def read_yaml(path: str | Path, error: type[OpenELMError], how: str = "fix the file") -> Any:
    """Read a YAML file with ``yaml.safe_load``; any failure becomes ``error`` naming the line.

    Raises:
        ``error``: the file is unreadable, not UTF-8, not YAML, nested too deeply or holds a
            number Python refuses to convert.
    """
    import yaml

    path = Path(path)
    raw = _read_bytes(path, error, how)
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or "syntax error"
        raise error(f"{where}: not valid YAML ({short(problem, 120)}); {how}") from None
    except (ValueError, RecursionError, UnicodeError) as e:
        raise error(f"{path}: {_reason(e)}; {how}") from None
