"""The quantization options of one conversion: checked up front, then turned into the stream of
output tensors (round-to-nearest as tensors stream past, or a learned method on the float model)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import ConfigError
from mlx_openelm.evaluate import read_texts

from .calibration import DEFAULT_SAMPLES, calibration_windows
from .learned import (
    check_method,
    learn_quantization,
    model_bits_per_weight,
    model_tensors,
    quantization_config,
)
from .quantize import check_quantization, plan_quantization, quantize_stream
from .tensors import TensorRef

Tensors = Iterator[tuple[str, mx.array]]


@dataclass(frozen=True, kw_only=True)
class QuantOptions:
    """How to quantize (see :func:`mlx_openelm.convert.convert` for each field)."""

    enabled: bool = False
    bits: int = 4
    group_size: int = 64
    mixed: str | None = None
    method: str = "rtn"
    calibration: str | Path | None = None
    calibration_samples: int = DEFAULT_SAMPLES
    bits_per_weight: float | None = None
    quantize_embedding: bool = True

    @property
    def active(self) -> bool:
        return self.enabled or self.mixed is not None or self.method != "rtn"

    def check(self) -> None:
        """Refuse bad options before any download or work.

        Raises:
            ConfigError, DataError: with the option at fault and how to fix it.
        """
        if self.active:
            check_quantization(self.bits, self.group_size, self.mixed)
            check_method(self.method, self.bits, self.bits_per_weight, self.group_size)
        if self.method != "rtn" and self.calibration is None:
            raise ConfigError(
                f"--method {self.method} needs --calibration FILE (text or JSONL of the kind "
                "of text the model will see)"
            )
        if self.method != "rtn" and self.mixed:
            raise ConfigError(f"--method {self.method} cannot be combined with --mixed; "
                              "use --method dynamic for a learned mix")  # fmt: skip
        if self.calibration is not None:
            read_texts(self.calibration)  # missing, empty or malformed

    def tensors(
        self,
        args: ModelArgs,
        tensors: Mapping[str, TensorRef],
        tokenizer: Any,
        dtype: mx.Dtype,
        stream: Callable[[], Tensors],
        on_write: Callable[[int, int, int, int, str], None] | None = None,
    ) -> tuple[Tensors, dict[str, Any] | None, float | None]:
        """``(output tensors, quantization config entry or None, bits per weight or None)``.

        ``stream()`` yields the cast source tensors (round-to-nearest quantizes them as they
        pass); a learned method loads them all into a float32 model instead, and ``on_write``
        then reports ``(bytes done, bytes total, tensors done, tensors total, name)``.
        """
        if not self.active:
            return stream(), None, None
        plan = plan_quantization(args, self.bits, self.group_size, self.mixed,
                                 quantize_embedding=self.quantize_embedding)  # fmt: skip
        if self.method == "rtn":
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            return quantize_stream(stream(), plan), plan.config(), plan.bits_per_weight(shapes)
        data = calibration_windows(
            self.calibration, tokenizer, args.vocab_size, self.calibration_samples
        )
        model = learn_quantization(
            _float_model(args, tensors), self.method, data, bits=self.bits,
            group_size=self.group_size, quantize_embedding=self.quantize_embedding,
            bits_per_weight=self.bits_per_weight, scale_dtype=dtype,
        )  # fmt: skip
        out = _reported(list(model_tensors(model, dtype)), on_write)
        return out, quantization_config(model), model_bits_per_weight(model)


def _float_model(args: ModelArgs, tensors: Mapping[str, TensorRef]) -> Any:
    """The whole model in float32 memory, for the learned methods."""
    from mlx_openelm.model import Model

    model = Model(args)
    model.load_weights([(k, ref.to_mlx(mx.float32)) for k, ref in tensors.items()], strict=True)
    mx.eval(model.parameters())
    return model


def _reported(items: list[tuple[str, mx.array]], on_write: Callable[..., None] | None) -> Tensors:
    total = sum(a.nbytes for _, a in items)
    done = 0
    for i, (name, array) in enumerate(items):
        yield name, array
        done += array.nbytes
        if on_write is not None:
            on_write(done, total, i + 1, len(items), name)
