"""Tests for the torch-free, restricted, lazy reader of ``torch.save`` checkpoints.

The pure-Python fixture writer (``torchfmt``) carries the suite; the tests at the end use real
torch when it is importable, to check the reader against ``torch.save`` and to prove that the
fixture writer produces what torch produces.
"""

from __future__ import annotations

import argparse
import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_openelm.errors import UnsafePickleError, WeightsError

import torchfmt as tf

try:
    from mlx_openelm.convert import torch_reader
except ImportError:  # a source tree that is not pip-installed: convert/ imports from the root
    from convert import torch_reader

from_numpy, Global, Reduce = tf.from_numpy, tf.Global, tf.Reduce
LazyTensor = torch_reader.LazyTensor
open_torch_checkpoint = torch_reader.open_torch_checkpoint
find_state_dict = torch_reader.find_state_dict
load_torch_state_dict = torch_reader.load_torch_state_dict

MLX_DTYPES = {
    "float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "float64": mx.float32,
    "int64": mx.int64, "int32": mx.int32, "int16": mx.int16, "int8": mx.int8, "uint8": mx.uint8,
    "bool": mx.bool_,
}  # fmt: skip


def _values(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random test values of ``dtype``; bfloat16 values are exact in bf16 (k/8, |k| < 256)."""
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype == "bfloat16":
        return (rng.integers(-255, 256, shape) / 8).astype(np.float32)
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _tensor(values: np.ndarray, dtype: str) -> tf.Tensor:
    return from_numpy(tf.bf16_bits(values) if dtype == "bfloat16" else values, dtype)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(MLX_DTYPES))
def test_every_dtype_round_trips_exactly(tmp_path: Path, dtype: str) -> None:
    values = _values(dtype, (3, 5))
    path = tf.save({"x": _tensor(values, dtype)}, tmp_path / "model.pt")
    with open_torch_checkpoint(path) as checkpoint:
        tensor = checkpoint.state_dict()["x"]
        assert (tensor.shape, tensor.dtype) == ((3, 5), dtype)
        assert tensor.nbytes == 15 * np.dtype(tf.NUMPY_DTYPES[dtype]).itemsize
        array = tensor.numpy()
        as_mlx = tensor.to_mlx()
    expected_np = np.float32 if dtype == "bfloat16" else np.dtype(tf.NUMPY_DTYPES[dtype])
    assert array.dtype == expected_np and array.flags.c_contiguous
    np.testing.assert_array_equal(array, values)
    assert as_mlx.dtype == MLX_DTYPES[dtype]
    np.testing.assert_array_equal(np.array(as_mlx.astype(mx.float32)), values.astype(np.float32))


def test_bfloat16_stays_bfloat16_in_mlx_and_casts_on_request(tmp_path: Path) -> None:
    values = _values("bfloat16", (4, 8))
    bits = tf.bf16_bits(values)
    path = tf.save({"w": from_numpy(bits, "bfloat16")}, tmp_path / "bf.pt")
    tensor = load_torch_state_dict(path)["w"]
    np.testing.assert_array_equal(tensor.raw(), bits)  # the raw bit patterns
    direct = tensor.to_mlx()
    assert direct.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(direct.view(mx.uint16)), bits)
    cast = tensor.to_mlx(mx.float16)
    assert cast.dtype == mx.float16
    np.testing.assert_array_equal(np.array(cast), values.astype(np.float16))


def test_scalar_and_empty_tensors(tmp_path: Path) -> None:
    scalar = from_numpy(np.array(2.5, dtype=np.float32))
    empty = tf.Tensor(tf.Storage("float32", np.zeros(0, np.float32)), 0, (0, 3), (3, 1))
    tensors = load_torch_state_dict(tf.save({"s": scalar, "e": empty}, tmp_path / "m.pt"))
    assert tensors["s"].shape == () and tensors["s"].numpy() == np.float32(2.5)
    assert tensors["e"].numpy().shape == (0, 3) and tensors["e"].nbytes == 0


# --- views: strides, offsets, shared storages ------------------------------------------------


def test_non_contiguous_views_come_out_right(tmp_path: Path) -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = from_numpy(base)
    views = {
        "base": t,
        "transposed": tf.Tensor(t.storage, 0, (4, 3), (1, 4)),  # base.T saved as a view
        "sliced": tf.Tensor(t.storage, 4, (2, 2), (4, 2)),  # base[1:, ::2]
        "expanded": tf.Tensor(t.storage, 8, (2, 4), (0, 1)),  # base[2].expand(2, 4)
        "with_attrs": tf.Tensor(t.storage, 0, (4, 3), (1, 4), attrs={"note": "kept by torch"}),
    }
    path = tf.save(views, tmp_path / "views.pt")
    with zipfile.ZipFile(path) as zf:  # one storage for all four tensors
        assert [n for n in zf.namelist() if "/data/" in n] == ["views/data/0"]
    tensors = load_torch_state_dict(path)
    expected = {
        "base": base,
        "transposed": base.T,
        "sliced": base[1:, ::2],
        "expanded": np.broadcast_to(base[2], (2, 4)),
        "with_attrs": base.T,
    }
    for name, want in expected.items():
        got = tensors[name].numpy()
        assert got.flags.c_contiguous, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        np.testing.assert_array_equal(np.array(tensors[name].to_mlx()), want, err_msg=name)


def test_shared_storage_reads_only_each_tensors_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = tf.Storage("float32", np.arange(10, dtype=np.float32))
    first = tf.Tensor(storage, 0, (4,), (1,))
    second = tf.Tensor(storage, 6, (2, 2), (2, 1))
    path = tf.save(OrderedDict(first=first, second=second), tmp_path / "shared.pt")

    reads: list[tuple[str, int, int]] = []
    archive_class = torch_reader.Archive
    original = archive_class.read_range

    def recording(self: object, name: str, start: int, length: int) -> np.ndarray:
        reads.append((name, start, length))
        return original(self, name, start, length)

    monkeypatch.setattr(archive_class, "read_range", recording)
    with open_torch_checkpoint(path) as checkpoint:
        tensors = checkpoint.state_dict()
        assert reads == []  # opening and inspecting shapes reads no tensor data
        np.testing.assert_array_equal(tensors["second"].numpy(), [[6, 7], [8, 9]])
        assert reads == [("shared/data/0", 24, 16)]
        np.testing.assert_array_equal(tensors["first"].numpy(), [0, 1, 2, 3])


# --- training checkpoints and find_state_dict ------------------------------------------------


def _corenet_checkpoint() -> dict:
    rng = np.random.default_rng(1)
    weights = OrderedDict(
        (name, from_numpy(rng.standard_normal(shape).astype(np.float32)))
        for name, shape in [("token_embeddings.weight", (8, 4)), ("layers.0.qkv.weight", (12, 4))]
    )
    step = from_numpy(np.array(7.0, dtype=np.float32))
    exp_avg = from_numpy(np.full((8, 4), 0.5, dtype=np.float32))
    args = tf.Obj(Global("argparse", "Namespace"), {"lr": 0.001, "model_name": "openelm"})
    return {
        "model_state_dict": weights,
        "epoch": 3,
        "iterations": 70_000,
        "best_metric": 1.5,
        "optim_state": {
            "state": {0: {"step": step, "exp_avg": exp_avg}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1]}],
        },
        "args": args,
        "shape": tf.Size((8, 4)),
        "note": b"bytes survive",
    }


def test_corenet_style_training_checkpoint(tmp_path: Path) -> None:
    source = _corenet_checkpoint()
    path = tf.save(source, tmp_path / "checkpoint.pt")
    with open_torch_checkpoint(path) as checkpoint:
        obj = checkpoint.obj
        state = checkpoint.state_dict()
    assert list(state) == ["token_embeddings.weight", "layers.0.qkv.weight"]
    for name, tensor in state.items():
        want = source["model_state_dict"][name].storage.data.reshape(tensor.shape)
        np.testing.assert_array_equal(tensor.numpy(), want)
    assert (obj["epoch"], obj["iterations"], obj["best_metric"]) == (3, 70_000, 1.5)
    optim = obj["optim_state"]
    assert optim["param_groups"] == [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1]}]
    assert optim["state"][0]["step"].numpy() == np.float32(7.0)
    np.testing.assert_array_equal(optim["state"][0]["exp_avg"].numpy(), np.full((8, 4), 0.5))
    assert isinstance(obj["args"], argparse.Namespace)
    assert vars(obj["args"]) == {"lr": 0.001, "model_name": "openelm"}
    assert obj["shape"] == (8, 4) and obj["note"] == b"bytes survive"
    assert list(load_torch_state_dict(path)) == list(state)


@pytest.mark.parametrize("key", ["model_state_dict", "state_dict", "model"])
def test_find_state_dict_looks_under_known_keys(tmp_path: Path, key: str) -> None:
    weight = from_numpy(np.ones((2, 2), np.float32))
    path = tf.save({"epoch": 1, key: {"w": weight}}, tmp_path / "ckpt.pt")
    assert list(load_torch_state_dict(path)) == ["w"]


def test_find_state_dict_returns_a_new_dict(tmp_path: Path) -> None:
    path = tf.save(OrderedDict(w=from_numpy(np.ones(2, np.float32))), tmp_path / "sd.pt")
    with open_torch_checkpoint(path) as checkpoint:
        state = find_state_dict(checkpoint.obj, path)
        state.pop("w")
        assert list(checkpoint.obj) == ["w"]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"epoch": 3, "optim_state": {}}, "top-level keys are 'epoch', 'optim_state'"),
        ({"w": from_numpy(np.ones(2, np.float32)), "step": 4}, "under keys 'step'"),
        ({"model_state_dict": {"w": 1.0}}, "top-level keys are 'model_state_dict'"),
        ([from_numpy(np.ones(2, np.float32))], "holds a list"),
        ({}, "top-level keys are (none)"),
    ],
)
def test_find_state_dict_errors_say_what_is_there(
    tmp_path: Path, obj: object, message: str
) -> None:
    path = tf.save(obj, tmp_path / "odd.pt")
    with pytest.raises(WeightsError, match="odd.pt") as info:
        load_torch_state_dict(path)
    assert message in str(info.value)


# --- safety: the allow-list ------------------------------------------------------------------


def _payloads(marker: Path) -> dict[str, object]:
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return {
        "os.system": Reduce(Global("os", "system"), (f"touch '{marker}'",)),
        "posix.system": Reduce(Global("posix", "system"), (f"touch '{marker}'",)),
        "builtins.eval": Reduce(Global("builtins", "eval"), (touch,)),
        "builtins.exec": Reduce(Global("__builtin__", "exec"), (touch,)),  # Python 2 spelling
        "subprocess.Popen": Reduce(Global("subprocess", "Popen"), (["touch", str(marker)],)),
        "subprocess.check_call": tf.Obj(Global("subprocess", "check_call"), {}),
        "torch.load": Reduce(Global("torch", "load"), (str(marker),)),
    }


def test_payload_is_live_under_plain_pickle(tmp_path: Path) -> None:
    """Control: the os.system payload the reader refuses really runs under ``pickle.loads``."""
    marker = tmp_path / "pwned"
    data, _ = tf.dumps(_payloads(marker)["os.system"])
    pickle.loads(data)  # noqa: S301 - the point of the control
    assert marker.exists()


@pytest.mark.parametrize("global_name", list(_payloads(Path("x"))))
def test_forbidden_globals_are_refused_before_running(tmp_path: Path, global_name: str) -> None:
    marker = tmp_path / "pwned"
    weights = {"w": from_numpy(np.ones(2, np.float32))}
    payload = {"model_state_dict": weights, "config": {"hook": [_payloads(marker)[global_name]]}}
    path = tf.save(payload, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError) as info:
        open_torch_checkpoint(path)
    message = str(info.value)
    assert f"'{global_name}'" in message and str(path) in message
    assert "malicious" in message and "trust" in message
    assert not marker.exists()


def test_build_opcode_cannot_patch_shared_objects(tmp_path: Path) -> None:
    """BUILD with slot state setattr()s on its target: it must only reach per-load copies."""
    state = (None, {"__repr__": Global("torch", "Size")})
    path = tf.save({"a": tf.Build(Global("argparse", "Namespace"), state)}, tmp_path / "cls.pt")
    repr_before = argparse.Namespace.__repr__
    open_torch_checkpoint(path).close()
    assert argparse.Namespace.__repr__ is repr_before
    assert repr(argparse.Namespace(a=1)) == "Namespace(a=1)"

    state = (None, {"__defaults__": (1,)})
    target = Global("torch._utils", "_rebuild_tensor_v2")
    path = tf.save({"b": tf.Build(target, state)}, tmp_path / "func.pt")
    with pytest.raises(WeightsError, match="func.pt"):  # the per-load copy refuses the state
        open_torch_checkpoint(path)
    assert torch_reader._rebuild_tensor_v2.__defaults__ is None


def test_unsupported_tensor_kinds_are_named(tmp_path: Path) -> None:
    sparse = Reduce(Global("torch._utils", "_rebuild_sparse_tensor"), (Global("torch", "float"),))
    path = tf.save({"w": sparse}, tmp_path / "sparse.pt")
    with pytest.raises(WeightsError, match="_rebuild_sparse_tensor"):
        open_torch_checkpoint(path)


# --- damaged and foreign files ---------------------------------------------------------------


def test_legacy_non_zip_checkpoint_says_how_to_resave(tmp_path: Path) -> None:
    path = tmp_path / "old.bin"  # the legacy format starts with a pickled magic number
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001))
    with pytest.raises(WeightsError, match="_use_new_zipfile_serialization=True") as info:
        open_torch_checkpoint(path)
    assert "old.bin" in str(info.value) and "legacy" in str(info.value)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    path = tf.save({"w": from_numpy(np.ones((64, 64), np.float32))}, tmp_path / "cut.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"cut\.pt.*truncated or corrupt"):
        open_torch_checkpoint(path)


def test_tensor_larger_than_its_storage_is_reported(tmp_path: Path) -> None:
    storage = tf.Storage("float32", np.ones(4, np.float32))
    path = tf.save({"w": tf.Tensor(storage, 2, (2, 2), (2, 1))}, tmp_path / "short.pt")
    with pytest.raises(WeightsError, match=r"short\.pt.*reads past the end"):
        open_torch_checkpoint(path)


def test_corrupt_storage_fails_its_crc(tmp_path: Path) -> None:
    path = tf.save({"w": from_numpy(np.arange(32, dtype=np.float32))}, tmp_path / "flip.pt")
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("flip/data/0")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 200] ^= 0xFF  # inside the 64-byte-aligned storage bytes
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"flip/data/0 fails its CRC"):
        load_torch_state_dict(path)["w"].numpy()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "(empty: "),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "(a safetensors file: "),
        (b"GGUF\x03\x00\x00\x00", "(not a zip: "),
    ],
)
def test_foreign_files_are_reported(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "weights.bin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match="weights.bin") as info:
        open_torch_checkpoint(path)
    assert message in str(info.value)


def test_zip_without_data_pkl_and_torchscript_are_reported(tmp_path: Path) -> None:
    plain = tmp_path / "plain.zip"
    tf.write_zip(plain, [("readme.txt", b"hi")])
    with pytest.raises(WeightsError, match="expected one '<name>/data.pkl' member, found 0"):
        open_torch_checkpoint(plain)
    data, _ = tf.dumps({})
    script = tmp_path / "scripted.pt"
    members = [("m/data.pkl", data), ("m/constants.pkl", data), ("m/code/__torch__.py", b"")]
    tf.write_zip(script, members)
    with pytest.raises(WeightsError, match="TorchScript"):
        open_torch_checkpoint(script)


# --- storage variants and lifetime -----------------------------------------------------------


def test_compressed_members_are_read_too(tmp_path: Path) -> None:
    base = np.arange(20, dtype=np.int64).reshape(4, 5)
    t = from_numpy(base)
    obj = {"base": t, "tail": tf.Tensor(t.storage, 11, (3, 2), (1, 5))}  # strided, offset view
    path = tf.save(obj, tmp_path / "zipped.pt", compress=True)
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("zipped/data/0").compress_type == zipfile.ZIP_DEFLATED
    tensors = load_torch_state_dict(path)
    np.testing.assert_array_equal(tensors["base"].numpy(), base)
    np.testing.assert_array_equal(tensors["tail"].numpy(), base.reshape(-1)[11:].reshape(-1)[
        np.array([[0, 5], [1, 6], [2, 7]])
    ])  # fmt: skip


def test_big_endian_checkpoints_are_byteswapped(tmp_path: Path) -> None:
    values = {d: _values(d, (2, 3)) for d in ("float32", "bfloat16", "int64")}
    obj = {d: _tensor(v, d) for d, v in values.items()}
    tensors = load_torch_state_dict(tf.save(obj, tmp_path / "be.pt", byteorder="big"))
    for dtype, want in values.items():
        got = tensors[dtype].numpy()
        assert got.dtype.isnative
        np.testing.assert_array_equal(got, want)


def test_tensors_outlive_the_checkpoint_until_the_file_changes(tmp_path: Path) -> None:
    path = tf.save({"w": from_numpy(np.arange(6, dtype=np.float32))}, tmp_path / "live.pt")
    with open_torch_checkpoint(path) as checkpoint:
        tensor = checkpoint.state_dict()["w"]
    np.testing.assert_array_equal(tensor.numpy(), np.arange(6))  # reopened for the read
    tf.save({"w": from_numpy(np.arange(9, dtype=np.float32))}, path)
    with pytest.raises(WeightsError, match="changed on disk"):
        tensor.numpy()


# --- real torch: the reader against torch.save, and the fixture writer against torch ---------


def _torch_reference(tensor: object) -> np.ndarray:
    torch = pytest.importorskip("torch")
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()
    return tensor.numpy()


def test_reader_matches_real_torch_save(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    flat = torch.arange(20, dtype=torch.float32)
    obj = {
        "f32": base,
        "f16": base.half(),
        "bf16": torch.randn(5, 7, generator=gen).bfloat16(),
        "f64": base.double(),
        "i64": torch.randint(-(2**40), 2**40, (4, 3), generator=gen),
        "i32": torch.randint(-1000, 1000, (3,), dtype=torch.int32, generator=gen),
        "i16": torch.tensor([-3, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": base > 0,
        "transposed": base.t(),
        "permuted": base.reshape(2, 3, 8).permute(2, 0, 1),
        "sliced": base[1:5, ::3],
        "shared_a": flat[:8],
        "shared_b": flat[10:16].view(2, 3),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "param": torch.nn.Parameter(torch.ones(3)),
        "param_with_state": torch.nn.Parameter(torch.full((2,), 4.0)),
        "with_attrs": base[::2].t(),
    }
    obj["param_with_state"].note = "pickled with _rebuild_parameter_with_state"
    obj["with_attrs"].note = "pickled with _rebuild_from_type_v2"
    path = tmp_path / "real.pt"
    torch.save(obj, path)
    tensors = load_torch_state_dict(path)
    assert list(tensors) == list(obj)
    for name, reference in obj.items():
        tensor = tensors[name]
        assert tensor.shape == tuple(reference.shape), name
        assert tensor.dtype == str(reference.dtype).removeprefix("torch."), name
        assert tensor.nbytes == reference.numel() * reference.element_size(), name
        np.testing.assert_array_equal(tensor.numpy(), _torch_reference(reference), err_msg=name)
    bits = obj["bf16"].view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(tensors["bf16"].raw(), bits)
    np.testing.assert_array_equal(np.array(tensors["bf16"].to_mlx().view(mx.uint16)), bits)


def test_real_linear_training_checkpoint(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-3)
    linear(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    extras = {
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "args": argparse.Namespace(lr=0.1),
        "metric": np.float64(0.25),
        "tags": {"a"},
    }
    checkpoint = {
        "model_state_dict": linear.state_dict(),
        "epoch": 3,
        "optim_state": optimizer.state_dict(),
        **extras,
    }
    path = tmp_path / "train.pt"
    torch.save(checkpoint, path)
    with open_torch_checkpoint(path) as opened:
        state, obj = opened.state_dict(), opened.obj
    assert list(state) == ["weight", "bias"]
    for name, tensor in state.items():
        np.testing.assert_array_equal(
            tensor.numpy(), _torch_reference(checkpoint["model_state_dict"][name])
        )
    for key, value in checkpoint["optim_state"]["state"][0].items():
        np.testing.assert_array_equal(obj["optim_state"]["state"][0][key].numpy(), value.numpy())
    assert obj["optim_state"]["param_groups"][0]["params"] == [0, 1]
    assert obj["epoch"] == 3 and obj["size"] == (2, 3) and obj["device"] == "cpu"
    assert obj["dtype"] == torch_reader.TorchDType("bfloat16")
    assert vars(obj["args"]) == {"lr": 0.1} and obj["metric"] == 0.25 and obj["tags"] == {"a"}


class _Named:
    """Stands for a global in :class:`_Structure`; calling it records the call."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: object) -> tuple:
        return (self.name, args)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Named) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return self.name


class _Structure(pickle.Unpickler):
    """Decodes a pickle into plain data (globals, calls, persistent ids) without running it."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict  # filled in by SETITEMS, so it must be a real mapping
        return _Named(f"{module}.{name}")

    def persistent_load(self, pid: object) -> tuple:
        return ("persistent_id", pid)


def test_fixture_writer_is_faithful_to_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    values = _values("float32", (3, 4))
    bf16_values = _values("bfloat16", (2, 3))
    real = {"w": torch.from_numpy(values), "b": torch.from_numpy(bf16_values).bfloat16()}
    real["wt"] = real["w"].t()
    real["wt"].note = "an attribute"
    torch.save(real, tmp_path / "real.pt")
    ours = {"w": from_numpy(values), "b": _tensor(bf16_values, "bfloat16")}
    ours["wt"] = tf.Tensor(ours["w"].storage, 0, (4, 3), (1, 4), attrs={"note": "an attribute"})
    tf.save(ours, tmp_path / "ours.pt")
    with zipfile.ZipFile(tmp_path / "real.pt") as zr, zipfile.ZipFile(tmp_path / "ours.pt") as zo:
        assert zo.namelist() == [n.replace("real/", "ours/") for n in zr.namelist()]
        for name in ("data/0", "data/1", "version", "byteorder"):
            assert zo.read(f"ours/{name}") == zr.read(f"real/{name}"), name
        pickles = [zf.read(f"{p}/data.pkl") for zf, p in ((zr, "real"), (zo, "ours"))]
        structures = [_Structure(io.BytesIO(data)).load() for data in pickles]
        assert structures[0] == structures[1]  # same calls, arguments and persistent ids
        # Same members in torch's writer give a byte-identical file: the zip layout matches.
        tf.write_zip(tmp_path / "rezip.pt", [(n, zr.read(n)) for n in zr.namelist()])
    assert (tmp_path / "rezip.pt").read_bytes() == (tmp_path / "real.pt").read_bytes()
    loaded = torch.load(tmp_path / "ours.pt", weights_only=True)  # torch reads our fixtures
    for name, tensor in real.items():
        assert torch.equal(loaded[name], tensor), name
        assert loaded[name].stride() == tensor.stride(), name
    assert loaded["wt"].note == "an attribute"
    assert loaded["wt"].untyped_storage().data_ptr() == loaded["w"].untyped_storage().data_ptr()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_real_legacy_torchscript_and_unsupported_dtypes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match="_use_new_zipfile_serialization"):
        open_torch_checkpoint(legacy)
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    with pytest.raises(WeightsError, match="TorchScript"):
        open_torch_checkpoint(scripted)
    for tensor, dtype in [(torch.ones(2, dtype=torch.complex64), "Complex"), (
        torch.ones(2).to(torch.uint16), "uint16")]:  # fmt: skip
        path = tmp_path / f"{dtype}.pt"
        torch.save({"w": tensor}, path)
        with pytest.raises(WeightsError, match=f"dtype {dtype}.*not support"):
            open_torch_checkpoint(path)
