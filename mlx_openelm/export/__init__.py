"""Deploy anywhere: export OpenELM models (and their fine-tunes) to GGUF for llama.cpp and Ollama.

:func:`export_gguf` writes the file llama.cpp's ``openelm`` architecture loads (see
:mod:`.layout` for what that is and where it was read from), with the ``gguf`` package (install
the ``gguf`` extra). ``lora_only`` writes the adapter alone as a GGUF LoRA instead, ``ollama``
adds a ``Modelfile``. Reading a GGUF back is the converter's job (``mlx_openelm.convert.gguf``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, MissingDependencyError, OutputExistsError
from .options import OutType, parse_outtype

if TYPE_CHECKING:
    from .model import ExportResult

__all__ = ["ExportResult", "OutType", "export_gguf"]


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "GGUF export needs the gguf package: pip install 'mlx-openelm[gguf]'"
        ) from None


def export_gguf(
    model: str | Path,
    output: str | Path,
    *,
    adapter: str | Path | None = None,
    outtype: str | OutType | None = None,
    tokenizer: str | Path | None = None,
    ollama: bool = False,
    lora_only: bool = False,
    force: bool = False,
) -> ExportResult:
    """Write ``output``: ``model`` as a GGUF llama.cpp runs (architecture ``openelm``).

    Args:
        model: an MLX (or Hugging Face OpenELM) model folder, or a hub repo id.
        output: the ``.gguf`` file to create (atomically; refused if it exists unless ``force``).
        adapter: an adapter folder to fuse in first (exactly, in float32); with ``lora_only``
            the adapter to export on its own.
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0``; default f16 (bf16 for 3B). Norms are
            always float32. A quantized MLX folder is dequantized first.
        tokenizer: an explicit ``tokenizer.model`` (else the folder's, else Llama-2's).
        ollama: also write ``Modelfile`` beside ``output`` (Zephyr template, our defaults).
        lora_only: write only the adapter, as a GGUF LoRA (``general.type = adapter``).
        force: replace an existing ``output`` (and ``Modelfile``).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ConfigError: an unknown outtype, a model llama.cpp cannot run (untied head), or options
            that do not go together.
        AdapterError: an adapter made for another model (or DoRA/full with ``lora_only``).
        OutputExistsError, ExportError: an existing output, a full disk; nothing is left behind.
    """
    _require_gguf()
    from ..hub import resolve_tokenizer_file
    from ..loading import load_model, resolve_model_path
    from ..tokenizer import Tokenizer
    from .layout import check_exportable
    from .lora import write_lora_gguf
    from .model import ExportResult, default_outtype, prepare_model, write_model_gguf
    from .ollama import MODELFILE, modelfile_text
    from .writer import QTYPES

    kind = parse_outtype(outtype) if outtype is not None else None
    output = Path(output).absolute()
    _check_options(output, adapter, kind, ollama, lora_only, force)
    folder = resolve_model_path(model)
    net, config = load_model(folder, lazy=True)
    check_exportable(net.args, str(folder))
    quantized = bool(config.get("quantization"))
    if lora_only:
        size, plan = write_lora_gguf(net, adapter, output, Path(adapter).name, force)
        return ExportResult(output, "f32", size, len(plan), lora_only=True)
    net, fused = prepare_model(net, quantized, adapter)
    kind = kind or default_outtype(net.args)
    tok_file = resolve_tokenizer_file(model_dir=folder, tokenizer=tokenizer)
    template = Tokenizer.from_folder(folder, tok_file).chat_template
    qtype = QTYPES[kind]
    size, plan = write_model_gguf(net, output, qtype, tok_file, template, folder.name, force)
    modelfile = None
    if ollama:
        from ..folder import atomic_write_text

        modelfile = output.with_name(MODELFILE)
        atomic_write_text(modelfile, modelfile_text(output, chat=bool(template)))
    fallback = [t.name for t in plan if len(t.shape) == 2 and t.qtype != qtype]
    return ExportResult(output, kind.value, size, len(plan), quantized, fused, fallback, modelfile)


def _check_options(
    output: Path,
    adapter: str | Path | None,
    outtype: OutType | None,
    ollama: bool,
    lora_only: bool,
    force: bool,
) -> None:
    """Refuse bad combinations before anything is loaded."""
    from .ollama import MODELFILE

    if output.exists() and not force:
        raise OutputExistsError(
            f"output {output} already exists; choose another path or pass --force to replace it"
        )
    if lora_only and adapter is None:
        raise ConfigError("--lora-only exports an adapter: pass it with --adapter DIR")
    if lora_only and outtype not in (None, OutType.f32):
        raise ConfigError("--lora-only writes float32 factors (they are small); drop --outtype")
    if lora_only and ollama:
        raise ConfigError(
            "--ollama needs the model GGUF: export the base model with --ollama, then add "
            "'ADAPTER ./adapter.gguf' to its Modelfile"
        )
    if ollama and (output.with_name(MODELFILE)).exists() and not force:
        raise OutputExistsError(
            f"{output.with_name(MODELFILE)} already exists; pass --force to replace it"
        )


def __getattr__(name: str):  # ExportResult without importing gguf/MLX up front
    if name == "ExportResult":
        from .model import ExportResult

        return ExportResult
    raise AttributeError(name)
