"""The GGUF layout llama.cpp expects for OpenELM (architecture ``openelm``), as data.

Read from llama.cpp itself: ``conversion/openelm.py`` (its HF converter), gguf-py's
``tensor_mapping.py``/``constants.py`` (``MODEL_ARCH.OPENELM``) and ``src/models/openelm.cpp``
(the graph). What it implies:

- tensor names: one rename table (``TO_GGUF``), used in both directions (``convert`` reads a GGUF
  back through :func:`from_gguf_name`); ``ffn.proj_1`` ([gate | up]) becomes two tensors,
  ``ffn_gate`` and ``ffn_up``, and a GGUF source is joined back;
- no ``output.weight``: the graph reuses ``token_embd`` as the output head (tied), so a model
  with its own ``lm_head`` cannot run there; the graph also always applies q/k norms and a
  gated SiLU FFN (SwiGLU), so models without them are refused too (:func:`check_exportable`);
- per-layer head counts and FFN widths as arrays; RoPE is NeoX style (rotate-half, ours).
"""

from __future__ import annotations

import re

from ..config import ModelArgs
from ..errors import ConfigError

ARCH = "openelm"

# (our name, GGUF name) patterns; ``{i}`` is the layer. proj_1 is split, see PROJ_1.
TO_GGUF: list[tuple[str, str]] = [
    ("transformer.token_embeddings.weight", "token_embd.weight"),
    ("transformer.norm.weight", "output_norm.weight"),
    ("transformer.layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight"),
    ("transformer.layers.{i}.attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight"),
    ("transformer.layers.{i}.attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    ("transformer.layers.{i}.attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
    ("transformer.layers.{i}.attn.out_proj.weight", "blk.{i}.attn_output.weight"),
    ("transformer.layers.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.weight"),
    ("transformer.layers.{i}.ffn.proj_2.weight", "blk.{i}.ffn_down.weight"),
]
PROJ_1 = "transformer.layers.{i}.ffn.proj_1.weight"
GATE, UP = "blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"


def _regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_FORWARD = [(_regex(ours), theirs) for ours, theirs in TO_GGUF]
_BACKWARD = [(_regex(theirs), ours) for ours, theirs in TO_GGUF]
_PROJ_1 = _regex(PROJ_1)


def _apply(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            return target.format(i=m.groupdict().get("i", ""))
    return None


def to_gguf_name(name: str) -> str | None:
    """The GGUF name of one of our tensors (None for ``proj_1``, which is split, or unknown)."""
    return _apply(name, _FORWARD)


def from_gguf_name(name: str) -> str | None:
    """Our name for a GGUF tensor (None for ``ffn_gate``/``ffn_up``, which are joined)."""
    return _apply(name, _BACKWARD)


def proj_1_layer(name: str) -> int | None:
    """The layer of a ``ffn.proj_1`` weight name, else None."""
    m = _PROJ_1.match(name)
    return int(m.group("i")) if m else None


def check_exportable(args: ModelArgs, where: str) -> None:
    """Refuse a model llama.cpp's OpenELM graph cannot run, saying why.

    Raises:
        ConfigError: an untied output head, no q/k norms or no gated FFN.
    """
    problems = []
    if not args.share_input_output_layers:
        problems.append(
            "it has its own output head (share_input_output_layers is false), but llama.cpp's "
            "OpenELM graph always uses the token embedding as the output layer"
        )
    if not args.normalize_qk_projections:
        problems.append("it has no q/k norms (normalize_qk_projections is false)")
    if not args.ffn_with_glu:
        problems.append("its FFN is not gated (ffn_with_glu is false)")
    activation = getattr(args, "activation_fn_name", "swish")
    if activation not in ("swish", "silu"):
        problems.append(f"its FFN activation is {activation!r}; llama.cpp's graph uses SiLU")
    if problems:
        raise ConfigError(
            f"{where} cannot be exported for llama.cpp: {'; '.join(problems)}. llama.cpp would "
            "load it with the wrong weights; keep running it with mlx-openelm"
        )
