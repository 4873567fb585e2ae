"""A tiny Llama-2-style SentencePiece model, trained on the fly for offline tests.

Same trainer settings as the Llama-2 tokenizer where they matter (BPE, byte fallback, identity
normalisation, dummy prefix, no whitespace collapsing, split digits, UNK=0 BOS=1 EOS=2, no PAD),
with a vocabulary of a few hundred pieces so training takes well under a second.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 400

_WORDS = (
    "the a of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "hello world model token language apple open efficient chat user assistant system reply"
).split()
_UNICODE_WORDS = (
    "café naïve résumé über façade jalapeño Ελληνικά русский 中文 日本語 한국어 "
    "😀 🚀 €5 ±3 “quoted” — …"
).split()


def _training_lines(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_UNICODE_WORDS))
        if rng.random() < 0.2:
            words.append(str(rng.randint(0, 99999)))
        line = " ".join(words)
        lines.append(line.capitalize() + rng.choice([".", "?", "!", ",", ""]))
    return lines


def make_tiny_sentencepiece(path: Path) -> Path:
    """Train a tiny byte-fallback BPE SentencePiece model and write it to ``path``.

    Deterministic (fixed corpus, one thread). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path
