"""Property-based fuzzing of every reader of untrusted bytes: random and mutated inputs end in
one of the project's errors or succeed, within a time bound, never in another exception.

Targets: the safetensors header reader (``convert.tensors.open_safetensors``), the restricted
unpickler (``convert.torch_reader.open_torch_checkpoint``), the config parser
(``ModelArgs.from_dict``) and the JSON/JSONL readers (``jsonio``, lora data, chat ``/load``,
eval data).

The default run is bounded to a few seconds in all (``FUZZ_EXAMPLES``, 200 cases per target);
``MLX_OPENELM_FUZZ=N`` runs N cases per target (e.g. 20000 for a long session).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Imported here, not in the tests: a first import inside a case would count against its deadline.
from convert.tensors import open_safetensors  # noqa: E402
from convert.torch_reader import load_torch_state_dict  # noqa: E402
from mlx_openelm.chat import read_transcript  # noqa: E402
from mlx_openelm.config import ModelArgs  # noqa: E402
from mlx_openelm.errors import OpenELMError  # noqa: E402
from mlx_openelm.evaluate import read_choice_tasks, read_texts  # noqa: E402
from mlx_openelm.jsonio import read_json  # noqa: E402
from mlx_openelm.lora.data import encode_file  # noqa: E402
from mlx_openelm.tokenizer import ZEPHYR_CHAT_TEMPLATE, Tokenizer  # noqa: E402

import torchfmt  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("MLX_OPENELM_FUZZ", "0")) or 200
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=5000,  # ms per case: a reader that stalls on a crafted input fails the test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=not os.environ.get("MLX_OPENELM_FUZZ"),  # reproducible in CI, fresh when long
    database=None,
)

# JSON values that have broken readers: huge numbers, NaN, deep nesting, odd strings.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "x" * 300, "\ud800", "", "false"]),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    """Overwrite, cut or extend ``data`` at the given (position, byte) pairs."""
    out = bytearray(data)
    for pos, byte in edits:
        if not out:
            out.append(byte)
            continue
        i = pos % (len(out) + 1)
        if byte < 16:
            del out[i:]
        elif byte < 32:
            out.insert(i, byte)
        elif i < len(out):
            out[i] = byte
    return bytes(out)


_edits = st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=6)


def _only_project_errors(fn, *args):
    try:
        return fn(*args)
    except OpenELMError:
        return None


# --- safetensors headers ------------------------------------------------------------------------

_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I8", "BOOL", "Q4"]), _scalars),
        "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=4), _json),
        "data_offsets": st.one_of(st.lists(st.integers(-8, 2**40), max_size=3), _json),
    },
)
_header = st.one_of(
    st.dictionaries(st.text(max_size=6), st.one_of(_entry, _json), max_size=4), _json
)


@FUZZ
@given(header=_header, data_len=st.integers(0, 256), edits=_edits)
def test_fuzz_safetensors_header(tmp_path_factory, header, data_len, edits):
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    raw = json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")
    blob = _mutate(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len, edits)
    path.write_bytes(blob)
    tensors = _only_project_errors(open_safetensors, path)
    for ref in (tensors or {}).values():  # what the reader accepted is within the file
        assert ref.start + ref.nbytes <= len(blob)
        _only_project_errors(ref.to_mlx)


# --- the restricted unpickler -------------------------------------------------------------------


def _valid_checkpoint(tmp: Path) -> tuple[bytes, list[tuple[str, bytes]]]:
    state = {
        "w": torchfmt.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "b": torchfmt.from_numpy(np.ones(3, dtype=np.float16)),
    }
    data_pkl, storages = torchfmt.dumps(state)
    return data_pkl, [(f"archive/data/{k}", s.data.tobytes()) for k, s in storages]


@FUZZ
@given(
    edits=_edits,
    opcodes=st.lists(st.binary(min_size=1, max_size=6), max_size=4),
    compress=st.booleans(),
)
def test_fuzz_restricted_unpickler(tmp_path_factory, edits, opcodes, compress):
    tmp = tmp_path_factory.mktemp("pt")
    data_pkl, storages = _valid_checkpoint(tmp)
    body = _mutate(data_pkl, edits)
    if opcodes:  # splice random opcode bytes in just after the protocol header
        body = body[:2] + b"".join(opcodes) + body[2:]
    path = tmp / "pytorch_model.bin"
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=mode) as zf:
        zf.writestr("archive/data.pkl", body)
        for name, data in storages:
            zf.writestr(name, data)
    state = _only_project_errors(load_torch_state_dict, path)
    for tensor in (state or {}).values():
        _only_project_errors(tensor.to_mlx)


# --- the config parser --------------------------------------------------------------------------

_FIELDS = {
    "num_transformer_layers": st.one_of(st.integers(-1, 600), _scalars),
    "model_dim": st.one_of(st.integers(-1, 2**32), _scalars),
    "head_dim": st.one_of(st.integers(-1, 256), _scalars),
    "vocab_size": st.one_of(st.integers(-1, 2**25), _scalars),
    "num_gqa_groups": st.one_of(st.integers(-1, 8), _scalars),
    "ffn_dim_divisor": st.one_of(st.integers(-1, 512), _scalars),
    "qkv_multipliers": st.one_of(st.lists(st.floats(), max_size=3), _json),
    "ffn_multipliers": st.one_of(st.lists(st.floats(), max_size=3), _json),
    "num_query_heads": st.one_of(st.lists(st.integers(-1, 64), max_size=5), _json),
    "num_kv_heads": st.one_of(st.lists(st.integers(-1, 64), max_size=5), _json),
    "share_input_output_layers": _scalars,
    "normalize_qk_projections": _scalars,
    "rms_norm_eps": _scalars,
    "rope_freq_constant": _scalars,
    "eos_token_id": _scalars,
    "quantization": st.one_of(_json, st.fixed_dictionaries({"bits": _scalars})),
    "activation_fn_name": _scalars,
    "model_type": st.sampled_from(["openelm", "llama", None]),
}


@FUZZ
@given(params=st.fixed_dictionaries({}, optional=_FIELDS))
def test_fuzz_config_parser(params):
    base = {"num_transformer_layers": 4, "model_dim": 64, "head_dim": 16, "vocab_size": 100}
    args = _only_project_errors(ModelArgs.from_dict, {**base, **params})
    if args is not None:  # an accepted config is one the model can be sized from
        n = args.num_transformer_layers
        assert len(args.num_query_heads) == len(args.num_kv_heads) == len(args.ffn_dims) == n
        assert all(q % kv == 0 and kv > 0 for q, kv in zip(args.num_query_heads, args.num_kv_heads))
        assert isinstance(args.num_parameters(), int) and args.num_parameters() > 0


# --- JSON / JSONL readers -----------------------------------------------------------------------

_SEEDS = [
    b'{"text": "To be, or not to be"}\n{"text": "that is the question"}\n',
    b'{"prompt": "Q", "completion": "A"}\n',
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
    b'{"role": "user", "content": "hi"}\n{"role": "assistant", "content": "hello"}\n',
    b'{"context": "c", "choices": ["a", "b"], "answer": 1}\n',
]
_lines = st.one_of(
    st.sampled_from(_SEEDS).flatmap(lambda seed: _edits.map(lambda e: _mutate(seed, e))),
    st.lists(_json, min_size=1, max_size=3).map(
        lambda values: b"\n".join(
            json.dumps(v, allow_nan=True).encode("utf-8", "surrogatepass") for v in values
        )
    ),
    st.binary(max_size=200),
    st.sampled_from([b"9" * 5000, b"[" * 50000, b'"\\ud800"', b"\xff\xfe", b"\xe2\x80\xa8"]),
)


@FUZZ
@given(raw=_lines)
def test_fuzz_jsonl_readers(tmp_path_factory, tiny_spm, raw):
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    path.write_bytes(raw)
    tok = _tokenizer(tiny_spm, Tokenizer, ZEPHYR_CHAT_TEMPLATE)
    _only_project_errors(read_json, path, OpenELMError)
    _only_project_errors(read_transcript, path)
    _only_project_errors(read_texts, path)
    _only_project_errors(read_choice_tasks, path)
    data = _only_project_errors(encode_file, path, tok, 64)
    if data is not None:
        assert all(0 < len(ex.tokens) <= 64 for ex in data.examples)


_TOKENIZERS: dict[Path, object] = {}


def _tokenizer(model_file: Path, cls, template: str):
    if model_file not in _TOKENIZERS:
        _TOKENIZERS[model_file] = cls(model_file, chat_template=template)
    return _TOKENIZERS[model_file]
