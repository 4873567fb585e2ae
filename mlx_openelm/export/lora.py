"""A LoRA adapter alone as a GGUF, for ``llama-cli --lora`` and Ollama's ``ADAPTER``.

llama.cpp's adapter format (``convert_lora_to_gguf.py``, ``src/llama-adapter.cpp``):
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``; for each adapted
weight ``W`` two tensors ``<W>.lora_a`` (r, in) and ``<W>.lora_b`` (out, r), PEFT's layout, and
llama.cpp adds ``(alpha / r) · B·A·x``. mlx-lm adds ``scale · (x @ lora_a) @ lora_b`` with
``lora_a`` (in, r), ``lora_b`` (r, out), so the GGUF factors are the transposes and
``alpha = scale · r``. ``ffn.proj_1`` is split into gate and up in the model GGUF, so its ``B``
is split by rows the same way and both halves share ``A``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn

from ..errors import AdapterError
from .layout import ARCH, GATE, UP, proj_1_layer, to_gguf_name
from .writer import PlannedTensor, Q, write_gguf


def _factors(adapter: Path) -> dict[str, dict[str, mx.array]]:
    from ..lora.adapters import ADAPTER_FILE

    factors: dict[str, dict[str, mx.array]] = defaultdict(dict)
    for name, value in mx.load(str(adapter / ADAPTER_FILE)).items():
        path, leaf = name.rsplit(".", 1)
        if leaf not in ("lora_a", "lora_b"):
            raise AdapterError(f"{adapter}: tensor {name} is not a LoRA factor (lora_a/lora_b)")
        factors[path][leaf] = value
    return factors


def _planned(name: str, a: mx.array) -> PlannedTensor:
    a = mx.contiguous(a.astype(mx.float32))
    return PlannedTensor(name, tuple(a.shape), Q.F32, lambda: a)


def plan_lora(net: nn.Module, adapter: Path) -> list[PlannedTensor]:
    """The ``lora_a``/``lora_b`` tensors of every adapted weight, under the GGUF names.

    Raises:
        AdapterError: a factor without its partner, or on a layer llama.cpp cannot adapt.
    """
    plan: list[PlannedTensor] = []
    for path, pair in sorted(_factors(adapter).items()):
        if set(pair) != {"lora_a", "lora_b"}:
            raise AdapterError(f"{adapter}: {path} has {', '.join(pair)} but needs both factors")
        a_t, b_t = pair["lora_a"].T, pair["lora_b"].T  # (r, in), (out, r)
        layer = proj_1_layer(f"{path}.weight")
        if layer is not None:
            ff = net.args.ffn_dims[layer]
            for target, rows in ((GATE, slice(0, ff)), (UP, slice(ff, 2 * ff))):
                base = target.format(i=layer)
                plan += [_planned(f"{base}.lora_a", a_t), _planned(f"{base}.lora_b", b_t[rows])]
            continue
        base = to_gguf_name(f"{path}.weight")
        if base is None:
            raise AdapterError(f"{adapter}: {path} has no place in llama.cpp's OpenELM layout")
        plan += [_planned(f"{base}.lora_a", a_t), _planned(f"{base}.lora_b", b_t)]
    return plan


def write_lora_gguf(
    net: nn.Module, adapter: str | Path, output: Path, name: str, force: bool
) -> tuple[int, list[PlannedTensor]]:
    """Check ``adapter`` against ``net`` and write it as a GGUF LoRA.

    Returns:
        ``(file size, the tensors written)``.

    Raises:
        AdapterError: not a plain LoRA (DoRA, full fine-tune) or made for another model.
        OutputExistsError, ExportError: as :func:`.writer.write_gguf`.
    """
    from ..loading import load_adapters
    from ..lora.adapters import read_adapter_config

    adapter = Path(adapter)
    config = read_adapter_config(adapter)
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterError(
            f"{adapter} is a {kind} fine-tune; a GGUF adapter holds plain LoRA factors only "
            "(llama.cpp has no DoRA magnitudes or full weights): export the fused model with "
            "--adapter instead of --lora-only"
        )
    load_adapters(net, adapter)  # AdapterError when the shapes do not fit this base model
    params = config["lora_parameters"]
    alpha = float(params["scale"]) * int(params["rank"])
    plan = plan_lora(net, adapter)

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(name)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

    return write_gguf(output, ARCH, metadata, plan, force), plan
