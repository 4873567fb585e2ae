"""The ``export-gguf`` command: a model (or its LoRA adapter) as a GGUF for llama.cpp and Ollama.

Registered on the app in ``cli.py``; imports neither MLX nor the ``gguf`` package until it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlx_openelm.cli_common import ForceOpt, TokenizerOpt, err, out
from mlx_openelm.export.options import OutType

# A plain string checked by the library (parse_outtype), so a bad value is one line and exit 1
# like every other input error, not a usage error (exit 2).
_OUTTYPES = "|".join(t.value for t in OutType)


def export_gguf(
    model: Annotated[str, typer.Argument(help="MLX model folder or hub repo id.")],
    output: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    adapter: Annotated[
        Path | None,
        typer.Option("--adapter", help="Adapter folder: fused in first (exactly, in float32)."),
    ] = None,
    outtype: Annotated[
        str | None,
        typer.Option(
            "--outtype",
            metavar=_OUTTYPES,
            help="Weight type; default f16 (bf16 for 3B). Norms stay f32.",
        ),
    ] = None,
    ollama: Annotated[
        bool, typer.Option("--ollama", help="Also write an Ollama Modelfile beside OUTPUT.")
    ] = False,
    lora_only: Annotated[
        bool,
        typer.Option("--lora-only", help="Write only the --adapter, as a GGUF LoRA (llama.cpp)."),
    ] = False,
    tokenizer: TokenizerOpt = None,
    force: ForceOpt = False,
) -> None:
    """Export to GGUF for llama.cpp and Ollama (architecture openelm)."""  # fmt: skip
    from mlx_openelm.export import export_gguf as export

    r = export(
        model, output, adapter=adapter, outtype=outtype, tokenizer=tokenizer,
        ollama=ollama, lora_only=lora_only, force=force,
    )  # fmt: skip
    if r.dequantized:
        err.print(
            "[yellow]Note:[/] the model folder is quantized; its weights were dequantized "
            "(MLX's affine groups have no ggml equivalent)"
        )
    if r.f16_fallback:
        err.print(f"[yellow]Note:[/] {len(r.f16_fallback)} tensor(s) stored as F16 (rows not a "
                  f"multiple of 32): {', '.join(r.f16_fallback)}")  # fmt: skip
    what = "LoRA adapter" if r.lora_only else f"{r.outtype} model"
    fused = f", {r.fused_layers} adapter layer(s) fused" if r.fused_layers else ""
    out.print(f"Wrote {what} to {r.path} ({r.size_bytes / 1e6:.1f} MB, {r.tensors} tensors{fused})")
    if r.modelfile is not None:
        out.print(f"Wrote {r.modelfile}; run: ollama create NAME -f {r.modelfile}")
