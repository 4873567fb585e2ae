"""Export a model (optionally fused with its adapters) to the GGUF llama.cpp runs as ``openelm``.

The model is loaded like everywhere else (:func:`mlx_openelm.loading.load_model`). A quantized
MLX folder is dequantized first: MLX's affine groups (a scale *and* a bias per group of 32-128)
have no ggml equivalent, so its weights are written as floats (or re-quantized to Q8_0). With
adapters, the model is cast to float32 and the adapters are fused by mlx-lm's ``fuse()``, so the
merge is exact before the one cast to the output type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
from gguf import GGMLQuantizationType
from mlx.utils import tree_flatten

from ..config import ModelArgs
from ..errors import ExportError
from .layout import ARCH, GATE, UP, check_exportable, proj_1_layer, to_gguf_name
from .options import OutType
from .vocab import Vocab, read_vocab
from .writer import FILE_TYPES, PlannedTensor, weight_qtype, write_gguf


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        path: the GGUF file.
        outtype: the storage type of the weights.
        size_bytes: size of the file.
        tensors: number of tensors in it.
        dequantized: the source folder was quantized and was dequantized first.
        fused_layers: adapter layers merged in (0 without ``--adapter``).
        f16_fallback: tensors stored as F16 because their rows do not fill Q8_0 blocks.
        modelfile: the Ollama Modelfile written beside it, if any.
        lora_only: the file is a LoRA adapter GGUF.
    """

    path: Path
    outtype: str
    size_bytes: int
    tensors: int
    dequantized: bool = False
    fused_layers: int = 0
    f16_fallback: list[str] = field(default_factory=list)
    modelfile: Path | None = None
    lora_only: bool = False


def default_outtype(args: ModelArgs) -> OutType:
    """f16, or bf16 for OpenELM-3B, whose activations need the range (as ``convert``)."""
    from ..convert import BF16_ABOVE_PARAMETERS

    return OutType.bf16 if args.num_parameters() > BF16_ABOVE_PARAMETERS else OutType.f16


def prepare_model(net: nn.Module, quantized: bool, adapter: str | Path | None) -> tuple:
    """Dequantize and fuse ``net`` in place for export; returns ``(net, fused layer count)``."""
    from mlx_lm.utils import dequantize_model

    from ..loading import load_adapters
    from ..lora.adapters import read_adapter_config
    from ..lora.fusing import fuse_model

    if quantized:
        net = dequantize_model(net)
    if adapter is None:
        return net, 0
    read_adapter_config(adapter)
    net.set_dtype(mx.float32)  # an exact merge: W + scale·(B·A) in float32, cast once at write
    net = load_adapters(net, adapter)
    return net, fuse_model(net)


def plan_tensors(net: nn.Module, qtype: GGMLQuantizationType) -> list[PlannedTensor]:
    """Every GGUF tensor of the model in the file's order (``proj_1`` split into gate, up).

    Raises:
        ExportError: a parameter with no GGUF name (a model this layout does not describe).
    """
    args: ModelArgs = net.args
    plan: list[PlannedTensor] = []
    for name, a in tree_flatten(net.parameters()):
        layer = proj_1_layer(name)
        if layer is not None:
            ff = args.ffn_dims[layer]
            shape = (ff, a.shape[1])
            for target, rows in ((GATE, slice(0, ff)), (UP, slice(ff, 2 * ff))):
                qtype = weight_qtype(shape, qtype)
                plan.append(PlannedTensor(target.format(i=layer), shape, qtype, _rows(a, rows)))
            continue
        target = to_gguf_name(name)
        if target is None:
            raise ExportError(f"tensor {name} has no place in llama.cpp's OpenELM layout")
        plan.append(PlannedTensor(target, tuple(a.shape), weight_qtype(a.shape, qtype), _same(a)))
    return sorted(plan, key=_file_order)


def _rows(a: mx.array, rows: slice):
    return lambda: a[rows]


def _same(a: mx.array):
    return lambda: a


def _file_order(t: PlannedTensor) -> tuple[int, str]:
    parts = t.name.split(".")
    return (int(parts[1]) + 1, t.name) if parts[0] == "blk" else (0, t.name)


def add_model_metadata(
    w: gguf.GGUFWriter, args: ModelArgs, name: str, qtype: GGMLQuantizationType
) -> None:
    """The ``general.*`` and ``openelm.*`` keys, as llama.cpp's own converter writes them."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(args.num_transformer_layers)
    w.add_context_length(args.max_context_length)
    w.add_embedding_length(args.model_dim)
    w.add_feed_forward_length(args.ffn_dims)
    w.add_head_count(list(args.num_query_heads))
    w.add_head_count_kv(list(args.num_kv_heads))
    w.add_rope_freq_base(float(args.rope_freq_constant))
    w.add_layer_norm_rms_eps(float(args.rms_norm_eps))
    w.add_rope_dimension_count(args.head_dim)  # rotary over the whole head
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)


def add_tokenizer_metadata(w: gguf.GGUFWriter, vocab: Vocab, chat_template: str | None) -> None:
    """SentencePiece (``llama``) vocabulary, special ids and the chat template."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_add_bos_token(True)  # Llama-2's tokenizer starts every sequence with <s>
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


def write_model_gguf(
    net: nn.Module,
    output: Path,
    qtype: GGMLQuantizationType,
    tokenizer_file: Path,
    chat_template: str | None,
    name: str,
    force: bool,
) -> tuple[int, list[PlannedTensor]]:
    """Write the model GGUF; returns ``(file size, the tensors written)``.

    Raises:
        ExportError: the tokenizer has more pieces than the model has embedding rows.
    """
    args: ModelArgs = net.args
    vocab = read_vocab(tokenizer_file, args.vocab_size)
    if vocab.pieces > args.vocab_size:
        raise ExportError(
            f"{tokenizer_file} has {vocab.pieces} pieces but the model only "
            f"{args.vocab_size} embedding rows; pass the tokenizer the model was trained with"
        )
    check_exportable(args, name)
    plan = plan_tensors(net, qtype)

    def metadata(w: gguf.GGUFWriter) -> None:
        add_model_metadata(w, args, name, qtype)
        add_tokenizer_metadata(w, vocab, chat_template)

    return write_gguf(output, ARCH, metadata, plan, force), plan
