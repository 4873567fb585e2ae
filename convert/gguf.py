"""GGUF sources: an OpenELM GGUF (F32, F16, BF16 or Q8_0) back into an MLX model folder.

For users who only have a GGUF (from ``export-gguf`` or llama.cpp's ``convert_hf_to_gguf.py``):
the file is read with the ``gguf`` package's reader (memory-mapped), its ``openelm.*`` keys
become the config, and its tensors are renamed back through the one table both directions use
(:mod:`mlx_openelm.export.layout`); ``ffn_gate`` and ``ffn_up`` are joined into ``proj_1``.
Q8_0 blocks are dequantized exactly (``scale · int8``) by the reader's own ``dequantize``.

A GGUF carries its vocabulary but no SentencePiece model file, so the output folder gets the
Llama-2 ``tokenizer.model`` (or ``--tokenizer``); :func:`check_vocab` makes sure its pieces are
the GGUF's, so a GGUF with another vocabulary is refused rather than converted into nonsense.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import ConfigError, MissingDependencyError, TokenizerError, WeightsError
from mlx_openelm.export.layout import ARCH, GATE, UP, from_gguf_name

from .checkpoint import Checkpoint
from .tensors import TensorRef

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "Q8_0": "float32"}


def _reader(path: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise MissingDependencyError(
            f"reading {path} needs the gguf package: pip install 'mlx-openelm[gguf]'"
        ) from None
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise WeightsError(f"{path} is not a readable GGUF file ({e}); download it again") from e


class GGUFTensor:
    """One tensor of a GGUF file (memory-mapped), read and converted when asked."""

    def __init__(self, path: Path, tensor: Any) -> None:
        self.path, self.name, self._tensor = path, tensor.name, tensor
        self.kind = tensor.tensor_type.name
        self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # rows first
        self.dtype = _DTYPES[self.kind]

    @property
    def nbytes(self) -> int:
        return int(self._tensor.n_bytes)

    def to_mlx(self, dtype: mx.Dtype | None = None) -> mx.array:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        data = self._tensor.data
        if self.kind == "BF16":
            a = mx.array(np.ascontiguousarray(data).view(np.uint16)).view(mx.bfloat16)
        elif self.kind == "Q8_0":
            a = mx.array(dequantize(np.asarray(data), GGMLQuantizationType.Q8_0))
        else:
            a = mx.array(np.asarray(data))
        a = a.reshape(self.shape)
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)


class JoinedRows:
    """Tensors stacked along their rows (``ffn_gate`` then ``ffn_up`` = ``proj_1``)."""

    def __init__(self, refs: Sequence[TensorRef]) -> None:
        self.refs = list(refs)
        self.shape = (sum(r.shape[0] for r in self.refs), *self.refs[0].shape[1:])
        self.dtype = self.refs[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.refs)

    def to_mlx(self, dtype: mx.Dtype | None = None) -> mx.array:
        return mx.concatenate([r.to_mlx(dtype) for r in self.refs], axis=0)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else value


def _per_layer(value: Any, layers: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * layers


def read_args(reader: Any, path: Path, vocab_rows: int) -> ModelArgs:
    """The model config from a GGUF's ``openelm.*`` keys.

    Raises:
        ConfigError: another architecture, an adapter GGUF, or missing keys.
    """
    arch, kind = _field(reader, "general.architecture"), _field(reader, "general.type", "model")
    if arch != ARCH:
        raise ConfigError(f"{path} is a {arch!r} GGUF; only OpenELM ({ARCH!r}) converts here")
    if kind != "model":
        raise ConfigError(f"{path} is a GGUF {kind}, not a model; convert the base model's GGUF")
    keys = ("block_count", "embedding_length", "attention.key_length", "feed_forward_length")
    missing = [f"{ARCH}.{k}" for k in keys if _field(reader, f"{ARCH}.{k}") is None]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}; it is not a complete OpenELM GGUF")
    n, dim = (
        int(_field(reader, f"{ARCH}.block_count")),
        int(_field(reader, f"{ARCH}.embedding_length")),
    )
    ffn = _per_layer(_field(reader, f"{ARCH}.feed_forward_length"), n)
    q = _per_layer(_field(reader, f"{ARCH}.attention.head_count"), n)
    kv = _per_layer(_field(reader, f"{ARCH}.attention.head_count_kv", q), n)
    divisor = 256 if all(f % 256 == 0 for f in ffn) else math.gcd(*ffn)
    head_dim = int(_field(reader, f"{ARCH}.attention.key_length"))
    groups = q[0] // kv[0]
    if any(h % groups or h // groups != k for h, k in zip(q, kv)):
        raise ConfigError(
            f"{path}: head counts {q} / KV heads {kv} do not share one query-to-KV ratio, which "
            "an OpenELM config (num_gqa_groups) needs"
        )
    params = {
        "num_transformer_layers": n,
        "model_dim": dim,
        "head_dim": head_dim,
        "vocab_size": vocab_rows,
        "num_query_heads": q,
        "num_kv_heads": kv,
        "num_gqa_groups": groups,
        # Per-layer multipliers that give these head counts back through Apple's formula, so
        # the config.json written from them is consistent.
        "qkv_multipliers": [h * head_dim / dim for h in q],
        # Widths are stored; the multipliers m = width / dim give them back exactly.
        "ffn_multipliers": [f / dim for f in ffn],
        "ffn_dim_divisor": divisor,
        "rope_freq_constant": float(_field(reader, f"{ARCH}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_field(reader, f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_context_length": int(_field(reader, f"{ARCH}.context_length", 2048)),
        # What llama.cpp's OpenELM graph always is (fields left out would take Apple's
        # OpenELMConfig defaults, which differ): tied head, q/k norms, SwiGLU, RMSNorm.
        "share_input_output_layers": True,
        "normalize_qk_projections": True,
        "ffn_with_glu": True,
        "activation_fn_name": "swish",
        "normalization_layer_name": "rms_norm",
    }
    args = ModelArgs.from_dict(params)
    if args.ffn_dims != ffn:
        raise ConfigError(f"{path}: FFN widths {ffn} cannot be expressed as OpenELM multipliers")
    return args


def _tensors(reader: Any, path: Path) -> dict[str, TensorRef]:
    refs = {t.name: GGUFTensor(path, t) for t in reader.tensors}
    odd = [f"{k} ({r.kind})" for k, r in refs.items() if r.kind not in _DTYPES]
    if odd:
        raise WeightsError(
            f"{path} stores {', '.join(odd[:6])}; only F32, F16, BF16 and Q8_0 GGUFs convert "
            "(export an f16 or q8_0 GGUF, or re-quantize with llama-quantize)"
        )
    out: dict[str, TensorRef] = {}
    for name, ref in refs.items():
        ours = from_gguf_name(name)
        if ours is not None:
            out[ours] = ref
        elif not name.endswith((".ffn_gate.weight", ".ffn_up.weight")):
            out[name] = ref  # unknown: left for the shape check to name
    for i in sorted({int(k.split(".")[1]) for k in refs if k.endswith(".ffn_gate.weight")}):
        gate, up = refs.get(GATE.format(i=i)), refs.get(UP.format(i=i))
        if gate is None or up is None:
            raise WeightsError(f"{path}: layer {i} has only one of ffn_gate and ffn_up")
        out[f"transformer.layers.{i}.ffn.proj_1.weight"] = JoinedRows([gate, up])
    return out


def open_gguf(path: Path) -> Checkpoint:
    """Open an OpenELM GGUF lazily.

    Raises:
        ConfigError, WeightsError: not an OpenELM model GGUF, or tensor types we cannot read.
    """
    reader = _reader(path)
    tensors = _tensors(reader, path)
    embedding = tensors.get("transformer.token_embeddings.weight")
    if embedding is None:
        raise WeightsError(f"{path} has no token_embd.weight; it is not an OpenELM model GGUF")
    args = read_args(reader, path, embedding.shape[0])
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return Checkpoint(
        format="gguf",
        args=args,
        tensors=tensors,
        rules=[],
        source={"format": "gguf", "path": str(path.absolute())},
        name=str(_field(reader, "general.name", path.stem)),
        files=[path],
        chat_template=_field(reader, "tokenizer.chat_template"),
        vocab=tokens,
    )


def check_vocab(vocab: Sequence[str], tokenizer: Any, where: str) -> None:
    """The tokenizer's pieces must be the GGUF's (its ``[PADn]`` rows aside).

    Raises:
        TokenizerError: naming the first differing id.
    """
    pieces = tokenizer.get_vocab()
    by_id = {i: p for p, i in pieces.items()}
    for i, token in enumerate(vocab):
        if i >= len(by_id):
            if token.startswith("[PAD"):
                continue
            raise TokenizerError(
                f"{where} has {len(vocab)} tokens but the tokenizer only {len(by_id)}; pass the "
                "tokenizer.model the model was trained with (--tokenizer)"
            )
        if by_id.get(i) != token:
            raise TokenizerError(
                f"{where}: token {i} is {token!r} but the tokenizer has {by_id.get(i)!r}; pass "
                "the tokenizer.model the model was trained with (--tokenizer)"
            )
