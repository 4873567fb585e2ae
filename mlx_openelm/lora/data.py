"""Fine-tuning data: JSONL files → token ids with a per-token training mask.

Three formats, detected per file from its first record (every line must then use the same keys):

- ``{"text": ...}``: the whole text is trained on; EOS is appended.
- ``{"prompt": ..., "completion": ...}``: rendered with the chat template as a user turn and an
  assistant turn when the tokenizer has one, else concatenated (+ EOS).
- ``{"messages": [{"role", "content"}, ...]}``: rendered with the chat template.

With ``mask_prompt`` only completions / *every* assistant turn count in the loss (mlx-lm trains on
the last turn only). Turn boundaries are found by rendering and tokenizing each prefix of the chat,
so they are exactly where the full rendering's tokens put them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import jsonio
from ..errors import DataError, TokenizerError
from ..tokenizer import common_prefix_length

FORMATS: dict[str, frozenset[str]] = {
    "text": frozenset({"text"}),
    "completions": frozenset({"prompt", "completion"}),
    "chat": frozenset({"messages"}),
}
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Example:
    """One training sequence: ``tokens`` (int32) and ``trained`` (bool, True = a loss target)."""

    tokens: np.ndarray
    trained: np.ndarray

    @property
    def num_inputs(self) -> int:
        """Input positions: every token but the last (each one predicts the next)."""
        return len(self.tokens) - 1


@dataclass(kw_only=True)
class Dataset:
    """One encoded JSONL file."""

    path: Path
    format: str
    examples: list[Example]
    truncated: int = 0
    dropped: int = 0
    sha256: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(e.tokens) for e in self.examples))

    @property
    def num_targets(self) -> int:
        return int(sum(int(e.trained[1:].sum()) for e in self.examples))

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "examples": len(self),
            "tokens": self.num_tokens,
            "trained_tokens": self.num_targets,
            "truncated": self.truncated,
            "dropped": self.dropped,
        }


def read_jsonl(path: str | Path) -> tuple[list[tuple[int, dict[str, Any]]], str]:
    """``(line number, object)`` for every non-blank line, and the file's sha256.

    Raises:
        DataError: missing file, invalid JSON (with file and line), a line that is not an object,
            or no records at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass --data DIR or --train FILE")
    raw = path.read_bytes()
    records = jsonio.read_jsonl(path, DataError, "each line must be one JSON object", raw=raw)
    if not records:
        raise DataError(f"{path} is empty: it holds no JSON lines to train on")
    return records, hashlib.sha256(raw).hexdigest()


def detect_format(records: list[tuple[int, dict[str, Any]]], path: Path) -> str:
    """The format of a file, from its first record; every record is then checked against it.

    Raises:
        DataError: unknown or missing keys (with file and line).
    """
    number, first = records[0]
    keys = set(first)
    if "messages" in keys:
        fmt = "chat"
    elif keys & {"prompt", "completion"}:
        fmt = "completions"
    elif "text" in keys:
        fmt = "text"
    else:
        raise DataError(
            f"{path}:{number}: no 'text', 'prompt'/'completion' or 'messages' key "
            f"(found {', '.join(sorted(keys)) or 'none'}); see `mlx-openelm lora --help`"
        )
    expected = FORMATS[fmt]
    for number, record in records:
        unknown, missing = set(record) - expected, expected - set(record)
        if unknown:
            raise DataError(
                f"{path}:{number}: unknown key(s) {', '.join(sorted(unknown))}; a {fmt}-format "
                f"file has only {', '.join(sorted(expected))}"
            )
        if missing:
            raise DataError(f"{path}:{number}: missing key(s) {', '.join(sorted(missing))}")
    return fmt


def _check_record(fmt: str, record: dict[str, Any], where: str, mask_prompt: bool) -> None:
    if fmt != "chat":
        for key, value in record.items():
            if not isinstance(value, str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
        return
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            raise DataError(f"{where}: message {i} must be an object with only role and content")
        if m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: message {i} has role {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} needs a string 'content'")
    if mask_prompt and not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: no assistant turn, so --mask-prompt leaves nothing to train on; "
            "add an assistant reply or drop the line"
        )


def _boundary(tokenizer: Any, text: str, ids: list[int]) -> int:
    """How many leading tokens of ``ids`` encode ``text`` (a prefix of the rendered chat)."""
    return common_prefix_length(tokenizer.encode(text), ids)


def _encode_chat(tokenizer: Any, messages: list[dict], mask_prompt: bool) -> Example:
    render = tokenizer.apply_chat_template
    ids = tokenizer.encode(render(messages, add_generation_prompt=False))
    trained = np.zeros(len(ids), dtype=bool)
    if not mask_prompt:
        trained[:] = True
    else:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render(messages[:i], add_generation_prompt=True) if i else ""
            start = _boundary(tokenizer, prompt, ids) if i else 0
            end = _boundary(tokenizer, render(messages[: i + 1], add_generation_prompt=False), ids)
            trained[start:end] = True
    return Example(np.asarray(ids, dtype=np.int32), trained)


def encode_record(tokenizer: Any, fmt: str, record: dict[str, Any], mask_prompt: bool) -> Example:
    """Token ids and training mask of one record (not truncated)."""
    eos = [tokenizer.eos_id]
    if fmt == "text":
        ids = tokenizer.encode(record["text"]) + eos
        return Example(np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool))
    if fmt == "chat":
        return _encode_chat(tokenizer, record["messages"], mask_prompt)
    prompt, completion = record["prompt"], record["completion"]
    if tokenizer.chat_template is not None:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return _encode_chat(tokenizer, turns, mask_prompt)
    ids = tokenizer.encode(prompt + completion) + eos
    trained = np.ones(len(ids), dtype=bool)
    if mask_prompt:
        trained[: _boundary(tokenizer, prompt, ids)] = False
    return Example(np.asarray(ids, dtype=np.int32), trained)


def encode_file(
    path: str | Path, tokenizer: Any, max_seq_len: int, mask_prompt: bool = False
) -> Dataset:
    """Read, check and tokenize one JSONL file; examples are truncated to ``max_seq_len`` tokens.

    Examples left with nothing to train on (a prompt longer than ``max_seq_len`` under
    ``mask_prompt``) are dropped and counted.

    Raises:
        DataError: missing/empty file, malformed line, unknown keys, bad messages (file:line).
    """
    path = Path(path)
    records, sha = read_jsonl(path)
    fmt = detect_format(records, path)
    if fmt == "chat" and tokenizer.chat_template is None:
        raise DataError(
            f"{path} holds chat messages but the model's tokenizer has no chat template; "
            "use an instruct model or a text/prompt-completion file"
        )
    if fmt == "text" and mask_prompt:
        raise DataError(
            f"{path} is plain text: --mask-prompt needs prompt/completion or messages data"
        )
    data = Dataset(path=path, format=fmt, examples=[], sha256=sha)
    for number, record in records:
        where = f"{path}:{number}"
        _check_record(fmt, record, where, mask_prompt)
        try:
            ex = encode_record(tokenizer, fmt, record, mask_prompt)
        except TokenizerError as e:
            raise DataError(f"{where}: {e}") from None
        if len(ex.tokens) > max_seq_len:
            data.truncated += 1
            ex = Example(ex.tokens[:max_seq_len], ex.trained[:max_seq_len])
        if len(ex.tokens) < 2 or not ex.trained[1:].any():
            data.dropped += 1
            continue
        data.examples.append(ex)
    if not data.examples:
        raise DataError(
            f"{path}: every example was dropped (nothing left to train on after truncation "
            f"to --max-seq-len {max_seq_len}); raise --max-seq-len"
        )
    return data


@dataclass(kw_only=True)
class Datasets:
    train: Dataset
    valid: Dataset | None = None
    test: Dataset | None = None


def resolve_files(
    data_dir: str | Path | None,
    train: str | Path | None,
    valid: str | Path | None,
    test: bool,
) -> dict[str, Path | None]:
    """Which file each split comes from: ``--data DIR`` or explicit ``--train``/``--valid``.

    Raises:
        DataError: neither or both given, a missing file or folder, ``--test`` without test.jsonl.
    """
    if (data_dir is None) == (train is None):
        raise DataError(
            "give either --data DIR (with train.jsonl, optional valid.jsonl/test.jsonl) "
            "or --train FILE [--valid FILE]"
        )
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"--data {folder} is not a folder with train.jsonl")
        files = {s: folder / f"{s}.jsonl" for s in SPLITS}
        found = {s: (p if p.is_file() else None) for s, p in files.items()}
        found["train"] = files["train"]  # a missing train.jsonl fails with its name
    else:
        found = {"train": Path(train), "valid": Path(valid) if valid else None, "test": None}
    if test and found["test"] is None:
        raise DataError("--test needs a test.jsonl in the --data folder")
    if not test:
        found["test"] = None
    return found


def load_datasets(
    tokenizer: Any,
    data_dir: str | Path | None = None,
    train: str | Path | None = None,
    valid: str | Path | None = None,
    test: bool = False,
    max_seq_len: int = 2048,
    mask_prompt: bool = False,
) -> Datasets:
    """Encode the train (and optional valid/test) files; see :func:`resolve_files`."""
    files = resolve_files(data_dir, train, valid, test)
    encoded = {
        split: encode_file(path, tokenizer, max_seq_len, mask_prompt) if path else None
        for split, path in files.items()
    }
    return Datasets(train=encoded["train"], valid=encoded["valid"], test=encoded["test"])
