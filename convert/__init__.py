"""Converters: every checkpoint a user brings -> an MLX model folder, streaming and atomic.

Sources (``sources``): a hub repo id, a local Hugging Face folder (safetensors or
``pytorch_model.bin``, single or sharded), a CoreNet ``.pt`` with its training YAML or size, an
OpenELM GGUF (``gguf``), or several of one kind averaged. Each is opened lazily, renamed by its
format's table (``hf.HF_RULES``, ``corenet.CORENET_RULES``), checked against the config, then
streamed tensor by tensor — cast, optionally quantized (``quantize``), written
(``mlx_openelm.folder``) — so peak memory stays near the largest tensor, not the model.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_openelm.choices import ChatTemplate, DType, values
from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import ConfigError, OpenELMWarning, OutputExistsError, WeightsError
from mlx_openelm.folder import write_model_folder
from mlx_openelm.outputs import check_replaceable

from .calibration import DEFAULT_SAMPLES
from .checkpoint import Checkpoint, average_checkpoints, prepare_tensors
from .learned import METHODS
from .options import QuantOptions
from .quality import QualityReport, quantization_quality
from .quantize import MIXED_PRESETS
from .sources import FORMATS, open_source
from .tensors import TensorRef

__all__ = [
    "FORMATS",
    "METHODS",
    "MIXED_PRESETS",
    "ConvertProgress",
    "ConvertResult",
    "QualityReport",
    "convert",
]

DTYPES = {d.value: getattr(mx, d.value) for d in DType}
CHAT_TEMPLATES = values(ChatTemplate)
# Above this many parameters (OpenELM-3B) the default dtype is bfloat16: Apple's MLX port
# (corenet mlx_examples/open_elm) says 3B "requires a greater activation range than the other
# model sizes" and should use bfloat16 for 16-bit and quantized inference.
BF16_ABOVE_PARAMETERS = 2_000_000_000
# On a CPU the probe's two forward passes are cheap below this size (quantized folders run
# dequantized to float32 there); above it they take minutes, so --quality asks for them.
PROBE_ON_CPU_BELOW = 1_000_000_000


@dataclass(frozen=True, kw_only=True)
class ConvertProgress:
    """A progress report after each tensor written (``phase`` is ``"convert"``)."""

    phase: str
    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    name: str = ""


@dataclass(frozen=True, kw_only=True)
class ConvertResult:
    """What a conversion produced.

    Attributes:
        path: the output folder.
        parameters: number of model parameters.
        size_bytes: bytes on disk of the whole folder.
        seconds: wall time of the conversion (including the quality check).
        dtype: the output float dtype.
        source: the source record written to ``config.json``.
        quantization: the ``quantization`` config entry, or None.
        bits_per_weight: average stored bits per quantized weight (scales included), or None.
        quality: quantized vs unquantized on a probe text, or None.
        method: the quantization method (``rtn``, ``gptq``...), or None.
    """

    path: Path
    parameters: int
    size_bytes: int
    seconds: float
    dtype: str
    source: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    bits_per_weight: float | None = None
    quality: QualityReport | None = None
    method: str | None = None


def convert(
    source: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    source_format: str | None = None,
    config_yaml: str | Path | None = None,
    size: str | None = None,
    dtype: str | None = None,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    mixed: str | None = None,
    method: str = "rtn",
    calibration: str | Path | None = None,
    calibration_samples: int = DEFAULT_SAMPLES,
    bits_per_weight: float | None = None,
    quantize_embedding: bool = True,
    tokenizer: str | Path | None = None,
    chat_template: str | None = None,
    quality: bool | None = None,
    force: bool = False,
    revision: str | None = None,
    on_progress: Callable[[ConvertProgress], None] | None = None,
    allow_nonfinite: bool = False,
) -> ConvertResult:
    """Convert a checkpoint into an MLX model folder.

    Args:
        source: a hub repo id, an HF folder, a CoreNet checkpoint file, or a list of several
            checkpoints of one kind, which are averaged (uniform mean, in float32).
        output: the folder to create (atomically; refused if it exists unless ``force``).
        source_format: ``"hf"``, ``"corenet"`` or ``"gguf"``; None detects it.
        config_yaml: a CoreNet training YAML (``model.language_modeling.general_gpt``).
        size: instead of ``config_yaml``: ``270M``, ``450M``, ``1_1B`` or ``3B``.
        dtype: ``float16``, ``bfloat16`` or ``float32``; default float16 (bfloat16 for 3B).
        quantize: quantize with ``bits`` and ``group_size`` (2/3/4/6/8; 32/64/128).
        mixed: a mixed-precision preset (``mixed_3_6``...); implies ``quantize``.
        method: ``rtn`` (round to nearest, streamed), or a learned method run on the float
            model in memory (``gptq``, ``awq``, ``dwq``, ``dynamic``; see ``convert.learned``);
            a learned method implies ``quantize`` and needs ``calibration``.
        calibration: text or JSONL file for learned methods and the quality probe (else the
            probe reads a built-in English passage); never downloaded.
        calibration_samples: windows of 256 tokens the learned methods take from it.
        bits_per_weight: ``dynamic``'s budget (scales included), e.g. 4.5.
        quantize_embedding: False keeps the tied embedding / output head in float.
        tokenizer: an explicit ``tokenizer.model`` (else the source's, else Llama-2's).
        chat_template: ``zephyr``, ``none`` or ``auto`` (None): the source's template, else
            Zephyr for ``-Instruct`` models.
        quality: after quantizing, measure the KL divergence, perplexity and top-1 cost on the
            calibration text (else a built-in passage) before the folder is renamed into place.
            None: on a GPU, or on a CPU for models under 1B parameters.
        force: replace an existing ``output``.
        revision: hub revision (branch, tag or commit) for a repo id.
        on_progress: called with a :class:`ConvertProgress` after each tensor is written.
        allow_nonfinite: write tensors holding NaN or infinity (with a warning naming them)
            instead of refusing.

    Returns:
        A :class:`ConvertResult`.

    Raises:
        OutputExistsError, ConfigError, ModelNotFoundError, WeightsError, UnsafePickleError,
        TokenizerError, DataError (calibration), QuantizationError (non-finite probe logits):
        with what, where and how to fix; nothing is written then.
    """
    start = time.perf_counter()
    output = Path(output)
    if output.exists() and not force:
        raise OutputExistsError(
            f"output {output} already exists; choose another path or pass --force to replace it"
        )
    if output.exists():
        check_replaceable(output)  # before the slow part; the writer checks again at the end
    out_dtype_name = _check_options(dtype, chat_template)
    quant = QuantOptions(enabled=quantize, bits=bits, group_size=group_size, mixed=mixed,
                         method=method, calibration=calibration,
                         calibration_samples=calibration_samples,
                         bits_per_weight=bits_per_weight,
                         quantize_embedding=quantize_embedding)  # fmt: skip
    quant.check()  # before any download
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise ConfigError("no source given; pass a repo id, a folder or a checkpoint file")
    cps = [open_source(s, source_format, config_yaml, size, revision) for s in sources]
    cp = cps[0] if len(cps) == 1 else average_checkpoints(cps)
    tensors = prepare_tensors(cp)
    out_dtype_name = out_dtype_name or _default_dtype(cp.args)
    out_dtype = DTYPES[out_dtype_name]
    tok = _tokenizer(cp, tokenizer, chat_template)

    def on_write(done: int, total: int, n: int, count: int, name: str) -> None:
        if on_progress is not None:
            on_progress(ConvertProgress(phase="write", bytes_done=done, bytes_total=total,
                                        tensors_done=n, tensors_total=count,
                                        name=name))  # fmt: skip

    nonfinite: list[str] = []

    def source_stream() -> Iterator[tuple[str, mx.array]]:
        stream = _stream(tensors, out_dtype, on_progress, nonfinite)
        return _then(stream, lambda: check_finite(nonfinite, allow_nonfinite))

    stream, quant_config, bpw = quant.tensors(
        cp.args, tensors, tok, out_dtype, source_stream, on_write
    )
    # Hashing the source files (4 GB for 1_1B) runs on another core while tensors are
    # converted; the record goes into config.json, which the writer serialises only after the
    # last tensor (_Pending is not JSON-serialisable, so any earlier use fails loudly).
    hashing = _Background(_source_record, cps)
    config = _output_config(cp.args, _Pending(), out_dtype_name, quant_config, method)
    stream = _then(stream, lambda: config.update(source=hashing.result()))
    if quality is None:
        quality = _probe_by_default(cp.args)
    reports: list[QualityReport] = []

    def probe(folder: Path) -> None:
        reports.append(
            quantization_quality(tensors, folder, cp.args, out_dtype, calibration=calibration)
        )

    totals = write_model_folder(
        output, config, stream, tokenizer=tok, generation_config=cp.generation_config,
        force=force, check=probe if (quant_config and quality) else None,
        expected_bytes=int(cp.args.num_parameters() * (bpw or 8 * out_dtype.size) / 8),
    )  # fmt: skip
    return ConvertResult(
        path=Path(totals["path"]),
        parameters=cp.args.num_parameters(),
        size_bytes=sum(f.stat().st_size for f in output.iterdir() if f.is_file()),
        seconds=time.perf_counter() - start,
        dtype=out_dtype_name,
        source=config["source"],
        quantization=quant_config,
        bits_per_weight=bpw,
        quality=reports[0] if reports else None,
        method=method if quant_config else None,
    )


def _probe_by_default(args: ModelArgs) -> bool:
    """On a GPU always; on a CPU (dequantized to float32) for models under 1B parameters."""
    if mx.default_device().type == mx.DeviceType.gpu:
        return True
    return args.num_parameters() < PROBE_ON_CPU_BELOW


def _check_options(dtype: str | None, chat_template: str | None) -> str | None:
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if chat_template is not None and chat_template not in CHAT_TEMPLATES:
        raise ConfigError(
            f"--chat-template must be one of {', '.join(CHAT_TEMPLATES)}, got {chat_template!r}"
        )
    return dtype


def _default_dtype(args: ModelArgs) -> str:
    return "bfloat16" if args.num_parameters() > BF16_ABOVE_PARAMETERS else "float16"


def _tokenizer(cp: Checkpoint, tokenizer: str | Path | None, chat_template: str | None) -> Any:
    """The output tokenizer, with the chat template the user asked for or the source implies."""
    from mlx_openelm.hub import resolve_tokenizer_file
    from mlx_openelm.tokenizer import ZEPHYR_CHAT_TEMPLATE, Tokenizer

    model_file = resolve_tokenizer_file(model_dir=cp.folder, tokenizer=tokenizer)
    # From the source folder, the tokenizer keeps that folder's own chat template, if any.
    tok = Tokenizer.from_folder(cp.folder, model_file) if cp.folder else Tokenizer(model_file)
    if cp.vocab is not None:  # a GGUF carries its vocabulary but no tokenizer.model
        from .gguf import check_vocab

        check_vocab(cp.vocab, tok, cp.name)
    tok.chat_template = tok.chat_template or cp.chat_template
    if chat_template == "zephyr":
        tok.chat_template = ZEPHYR_CHAT_TEMPLATE
    elif chat_template == "none":
        tok.chat_template = None
    elif tok.chat_template is None and "instruct" in cp.name.lower():
        tok.chat_template = ZEPHYR_CHAT_TEMPLATE  # auto: OpenELM-Instruct was tuned with Zephyr's
    return tok


def _source_record(cps: Sequence[Checkpoint]) -> dict[str, Any]:
    """Where the weights came from: repo id + revision, or each local file's sha256."""
    from mlx_openelm.hub import file_sha256

    records = [
        cp.source
        if "repo_id" in cp.source
        else {**cp.source, "files": [{"file": f.name, "sha256": file_sha256(f)} for f in cp.files]}
        for cp in cps
    ]
    return records[0] if len(records) == 1 else {"averaged": len(records), "checkpoints": records}


class _Pending:
    """Placeholder for a value computed in the background (deliberately not serialisable)."""


class _Background:
    """Run ``fn(*args)`` on a daemon thread (Ctrl-C does not wait for it); ``result()`` joins."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # handed to the caller by result()
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def check_finite(names: Sequence[str], allow: bool) -> None:
    """Refuse weights with NaN/inf (a diverged or damaged checkpoint), or warn when allowed.

    Raises:
        WeightsError: ``names`` is not empty and ``allow`` is False.
    """
    if not names:
        return
    listed = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
    if not allow:
        raise WeightsError(
            f"{len(names)} tensor(s) hold NaN or infinite values: {listed}; the checkpoint "
            "diverged or is damaged (or overflows --dtype float16: try bfloat16). Pass "
            "--allow-nonfinite to convert it anyway"
        )
    warnings.warn(f"converted with NaN/infinite values in {listed}", OpenELMWarning, stacklevel=2)


def _then(items: Iterable[Any], finish: Callable[[], None]) -> Iterator[Any]:
    """Yield ``items``, then call ``finish()`` once they are exhausted."""
    yield from items
    finish()


def _output_config(
    args: ModelArgs,
    source: dict[str, Any],
    dtype: str,
    quantization: dict[str, Any] | None,
    method: str = "rtn",
) -> dict[str, Any]:
    from mlx_openelm import __version__

    config = args.to_dict()
    config["torch_dtype"] = dtype
    if quantization is not None:
        config["quantization"] = dict(quantization)
    config["source"] = source
    config["converted_by"] = {
        "tool": "mlx-openelm",
        "version": __version__,
        "dtype": dtype,
        "quantization": dict(quantization) if quantization else None,
        "method": method if quantization else None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return config


def _stream(
    tensors: Mapping[str, TensorRef],
    dtype: mx.Dtype,
    on_progress: Callable[[ConvertProgress], None] | None,
    nonfinite: list[str],
) -> Iterator[tuple[str, mx.array]]:
    """Read, cast and hand on one tensor at a time, reporting progress after each; the names of
    tensors holding NaN or infinity (after the cast: float16 overflows too) go to ``nonfinite``."""
    total = sum(ref.nbytes for ref in tensors.values())
    done = 0
    for i, (name, ref) in enumerate(tensors.items()):
        array = ref.to_mlx(dtype)
        if mx.issubdtype(array.dtype, mx.floating) and not mx.isfinite(array).all().item():
            nonfinite.append(name)
        yield name, array
        done += ref.nbytes
        if on_progress is not None:
            on_progress(
                ConvertProgress(
                    phase="convert",
                    bytes_done=done,
                    bytes_total=total,
                    tensors_done=i + 1,
                    tensors_total=len(tensors),
                    name=name,
                )
            )
