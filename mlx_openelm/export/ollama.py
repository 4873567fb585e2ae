"""An Ollama ``Modelfile`` for an exported GGUF: ``ollama create NAME -f Modelfile`` and done.

The ``TEMPLATE`` is the Zephyr format OpenELM-Instruct was tuned with (Apple's template, see
:data:`mlx_openelm.tokenizer.ZEPHYR_CHAT_TEMPLATE`), written in Ollama's Go template syntax:
``<|system|>\\n{sys}</s>\\n<|user|>\\n{msg}</s>\\n<|assistant|>\\n{reply}</s>\\n``, ending with the
generation prompt ``<|assistant|>\\n``. The BOS token comes from the GGUF
(``tokenizer.ggml.add_bos_token``). Generation stops at ``</s>`` and, should the model start a
new turn itself, at ``<|user|>``. The sampling parameters are this project's defaults for
``generate``/``chat`` (greedy, no top-p, no repetition penalty), so Ollama answers as we do.
"""

from __future__ import annotations

from pathlib import Path

from ..generate_options import DEFAULT_TEMP, DEFAULT_TOP_K, DEFAULT_TOP_P
from ..tokenizer import MODEL_MAX_LENGTH

MODELFILE = "Modelfile"

ZEPHYR_GO_TEMPLATE = (
    "{{- range .Messages }}\n"
    '{{- if eq .Role "system" }}<|system|>\n'
    "{{ .Content }}</s>\n"
    '{{ else if eq .Role "user" }}<|user|>\n'
    "{{ .Content }}</s>\n"
    '{{ else if eq .Role "assistant" }}<|assistant|>\n'
    "{{ .Content }}</s>\n"
    "{{ end }}\n"
    "{{- end }}<|assistant|>\n"
)
STOP = ("</s>", "<|user|>")


def modelfile_text(gguf_path: Path, chat: bool) -> str:
    """The Modelfile for ``gguf_path`` (referenced relative to the Modelfile's folder).

    Args:
        gguf_path: the exported GGUF file.
        chat: the model has a chat template (instruct): add the Zephyr ``TEMPLATE``; a base
            model gets a plain completion template.
    """
    lines = [
        "# Written by `mlx-openelm export-gguf --ollama`. Create the model with:",
        f"#   ollama create NAME -f {MODELFILE}",
        f"FROM ./{gguf_path.name}",
        "",
    ]
    template = ZEPHYR_GO_TEMPLATE if chat else "{{ .Prompt }}"
    lines += [f'TEMPLATE """{template}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in STOP]
    lines += [
        f"PARAMETER num_ctx {MODEL_MAX_LENGTH}",
        f"PARAMETER temperature {DEFAULT_TEMP}",
        f"PARAMETER top_p {DEFAULT_TOP_P}",
        f"PARAMETER top_k {DEFAULT_TOP_K}",
        "# No repetition penalty (ours is off by default; Apple's model card uses 1.2).",
        "PARAMETER repeat_penalty 1.0",
    ]
    return "\n".join(lines) + "\n"
