"""Streaming decode for the Llama-2 SentencePiece vocabulary OpenELM uses.

Decoding works piece by piece (``▁`` → space, ``<0xNN>`` → byte) over a piece table built once
per tokenizer (:func:`piece_table`), in one state machine, :class:`StreamingDetokenizer`, that
:meth:`~mlx_openelm.tokenizer.Tokenizer.decode` also uses, so streamed chunks always join to
exactly the full decode. Bytes of unfinished UTF-8 characters are held back; invalid bytes become
one U+FFFD each, as in SentencePiece's decode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sentencepiece as spm

from mlx_openelm.errors import TokenizerError

if TYPE_CHECKING:
    from mlx_openelm.tokenizer import Tokenizer

__all__ = ["BYTE", "NORMAL", "SPECIAL", "StreamingDetokenizer", "piece_table"]

# Piece kinds in the decode table.
NORMAL, BYTE, SPECIAL = 0, 1, 2


class StreamingDetokenizer:
    """Incremental decode for generation, in the shape mlx-lm's detokenizers have.

    ``add_token`` returns the text the token completes (possibly ``""``): bytes of an unfinished
    UTF-8 character from byte-fallback pieces (``<0xE2><0x82><0xAC>``) are held until complete,
    and the leading ``▁`` of the first piece is dropped only at the very start, like the full
    decode. The chunks join to exactly ``Tokenizer.decode(tokens)``. ``text`` holds all text so
    far, ``tokens`` all ids, and ``last_segment`` the text since it was last read.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._pieces = tokenizer.pieces
        self.skip_special = skip_special
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text (fresh lists, so shallow copies do not share state)."""
        self.tokens: list[int] = []
        self.offset = 0  # characters handed out through ``last_segment`` (mlx-lm's field)
        self._parts: list[str] = []  # all text, joined lazily by ``text``
        self._unread: list[str] = []  # text not yet returned by ``last_segment``
        self._pending = bytearray()
        self._segment_start = True

    @property
    def text(self) -> str:
        """All text so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def last_segment(self) -> str:
        """The text added since this property was last read."""
        segment = "".join(self._unread)
        self._unread = []
        self.offset += len(segment)
        return segment

    def add_token(self, token: int) -> str:
        """Consume one id and return the text it completes.

        Raises:
            TokenizerError: The id is outside the vocabulary.
        """
        if not 0 <= token < len(self._pieces):
            raise TokenizerError(
                f"Token id {token} is outside the tokenizer's {len(self._pieces)} ids; the model "
                "and the tokenizer do not match."
            )
        self.tokens.append(token)
        kind, text, byte = self._pieces[token]
        if kind == BYTE:
            self._pending.append(byte)
            self._segment_start = False  # SentencePiece: a byte piece takes the dummy-prefix slot
            return self._emit(self._take_bytes(force=False))
        if kind == SPECIAL:
            if self.skip_special:
                return ""
            self._segment_start = True
        elif self._segment_start:
            self._segment_start = False
            if text.startswith(" "):
                text = text[1:]  # the dummy prefix SentencePiece added when encoding
        return self._emit(self._take_bytes(force=True) + text if self._pending else text)

    def finalize(self) -> str:
        """Flush held bytes (an unfinished character becomes U+FFFD per byte) and return them."""
        return self._emit(self._take_bytes(force=True))

    def _emit(self, chunk: str) -> str:
        if chunk:
            self._parts.append(chunk)
            self._unread.append(chunk)
        return chunk

    def _take_bytes(self, force: bool) -> str:
        if not self._pending:
            return ""
        cut = len(self._pending) if force else _complete_prefix_len(self._pending)
        data = bytes(self._pending[:cut])
        del self._pending[:cut]
        return _decode_bytewise(data)


def piece_table(sp: spm.SentencePieceProcessor) -> list[tuple[int, str, int]]:
    """(kind, text, byte) per id: text with ``▁`` as a space; byte only for ``<0xNN>`` pieces."""
    table = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            table.append((BYTE, "", int(piece[3:5], 16)))
        elif sp.is_control(i) or sp.is_unknown(i):
            table.append((SPECIAL, piece, -1))
        else:
            table.append((NORMAL, piece.replace("\u2581", " "), -1))
    return table


def _complete_prefix_len(buf: bytearray) -> int:
    """Length of ``buf`` without a trailing, still unfinished UTF-8 character.

    Cuts only before a non-continuation byte, so no valid character is ever split.
    """
    for back in range(1, min(4, len(buf)) + 1):
        lead = buf[-back]
        if lead & 0xC0 != 0x80:  # not a continuation byte: the last character starts here
            need = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            return len(buf) - back if back < need else len(buf)
    return len(buf)


def _decode_bytewise(data: bytes) -> str:
    """UTF-8 decode with one U+FFFD per invalid byte, as SentencePiece's decode does.

    Per-byte replacement makes decoding local: decoding two parts cut before a non-continuation
    byte gives the same text as decoding the whole.
    """
    parts = []
    while True:
        try:
            parts.append(data.decode("utf-8"))
            return "".join(parts)
        except UnicodeDecodeError as exc:
            parts.append(data[: exc.start].decode("utf-8"))
            parts.append("\ufffd" * (exc.end - exc.start))
            data = data[exc.end :]
