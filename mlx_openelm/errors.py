"""Exceptions raised by mlx-openelm.

Every error says *what* went wrong, *where* (file, field, tensor, line) and *how to fix it*.
The CLI turns any ``OpenELMError`` into one red line and exit code 1 (``--debug`` shows the
traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OpenELMError(Exception):
    """Base class for every error a user can cause and fix."""


class ConfigError(OpenELMError):
    """A model configuration is missing a field, has a bad value or is inconsistent."""


class WeightsError(OpenELMError):
    """Weights are missing, unexpected, mis-shaped or unreadable."""


class TokenizerError(OpenELMError):
    """A tokenizer file is missing, unreadable or not the expected Llama-2 model."""


class ModelNotFoundError(OpenELMError):
    """A model path or hub repository cannot be found (or is not cached while offline)."""


class UnsafePickleError(OpenELMError):
    """A PyTorch pickle asked for a global outside the allow-list."""


class DataError(OpenELMError):
    """A dataset or input file is missing, empty or malformed."""


class AdapterError(OpenELMError):
    """LoRA adapters do not match the model or are unreadable."""


class OutputExistsError(OpenELMError):
    """An output path already exists and ``--force`` was not given."""


class GenerationError(OpenELMError):
    """Generation options are invalid (a sampling value out of range, a draft model that does
    not match, an empty prompt or one longer than the context)."""


class SchemaError(GenerationError):
    """A JSON schema for structured output is not JSON, too large, or cannot be compiled."""


class TrainingError(OpenELMError):
    """Fine-tuning cannot continue (e.g. the loss became NaN or infinite)."""


class QuantizationError(OpenELMError):
    """Quantizing produced an unusable model (e.g. NaN or infinite logits on the probe)."""


class ServeError(OpenELMError):
    """The server cannot start: its optional dependencies are missing or the address is taken."""


class DiskFullError(OpenELMError):
    """The disk filled up while writing an output (nothing partial is left behind)."""


class OpenELMWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it)."""


def short(text: object, limit: int = 200) -> str:
    """``text`` (``str()`` of it) cut to about ``limit`` characters, keeping head and tail.

    Error messages quote user values; a 5 MB value must not become a 5 MB error line.
    """
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 10, 1)
    return f"{text[:keep]} …[{len(text) - 2 * keep} characters cut]… {text[-keep:]}"


class MissingDependencyError(OpenELMError):
    """An optional extra a command needs is not installed (the message says how to add it)."""


class ExportError(OpenELMError):
    """An export cannot be written (a full disk, a bad output path) or does not fit its target."""
