"""The SentencePiece vocabulary as GGUF stores it: pieces, real scores and token types.

llama.cpp's ``llama`` tokenizer (``tokenizer.ggml.model = "llama"``) is SentencePiece's BPE
rebuilt from these three arrays, so the scores must be SentencePiece's own merge priorities (not
placeholders) and the types must mark ``<unk>``, the control tokens and the 256 byte-fallback
pieces, exactly as llama.cpp's ``_create_vocab_sentencepiece`` derives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from gguf import TokenType


@dataclass(frozen=True)
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pieces: int  # the tokenizer's own piece count (<= len(tokens))


def _token_type(sp: spm.SentencePieceProcessor, i: int) -> TokenType:
    if sp.IsUnknown(i):
        return TokenType.UNKNOWN
    if sp.IsControl(i):
        return TokenType.CONTROL
    if sp.IsUnused(i):
        return TokenType.UNUSED
    if sp.IsByte(i):
        return TokenType.BYTE
    return TokenType.NORMAL


def read_vocab(model_file: str | Path, vocab_size: int) -> Vocab:
    """The vocabulary of ``model_file`` padded (or cut) to the model's ``vocab_size`` rows.

    Rows past the tokenizer's pieces (never produced by it) are named ``[PADn]`` and marked
    unused, as llama.cpp's converter does.
    """
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = min(sp.vocab_size(), vocab_size)
    tokens = [sp.IdToPiece(i).encode("utf-8") for i in range(n)]
    scores = [float(sp.GetScore(i)) for i in range(n)]
    types = [int(_token_type(sp, i)) for i in range(n)]
    for i in range(n, vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-10000.0)
        types.append(int(TokenType.UNUSED))
    return Vocab(tokens, scores, types, sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.vocab_size())
