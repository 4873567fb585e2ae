"""OpenELM model configuration: Apple's field names, layer-wise scaling, presets.

``ModelArgs`` uses the field names of Apple's Hugging Face ``config.json``
(``configuration_openelm.py``) so a folder we write loads in mlx-lm and transformers alike. The
per-layer head counts and FFN widths are derived exactly as Apple does: a ``np.linspace``
between two multipliers, rounded to 2 decimals, passed through ``make_divisible``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from numbers import Number
from typing import Any

import numpy as np

from .choices import CoreNetSize
from .config_check import _check_int, check_fields
from .errors import ConfigError

MODEL_TYPE = "openelm"

# (num_transformer_layers, model_dim, head_dim) of Apple's released sizes; all share the rest.
PRESETS: dict[str, tuple[int, int, int]] = {
    CoreNetSize.s270M.value: (16, 1280, 64),
    CoreNetSize.s450M.value: (20, 1536, 64),
    CoreNetSize.s1_1B.value: (28, 2048, 64),
    CoreNetSize.s3B.value: (36, 3072, 128),
}
# What Apple's released sizes set beyond Apple's defaults (CoreNet's ``gpt_configs``).
_PRESET_COMMON: dict[str, Any] = {
    "num_gqa_groups": 4,
    "qkv_multipliers": (0.5, 1.0),
    "ffn_multipliers": (0.5, 4.0),
    "ffn_dim_divisor": 256,
    "vocab_size": 32000,
    "normalize_qk_projections": True,
    "share_input_output_layers": True,
}

# ``activation_fn_name`` values Apple's code accepts (transformers' ``ACT2FN``) that the model
# computes exactly (``model.ACTIVATIONS``). ``prelu`` has a learned slope no checkpoint stores.
ACTIVATION_NAMES = (
    "swish", "silu", "gelu", "gelu_python", "gelu_new", "gelu_fast", "gelu_accurate",
    "gelu_pytorch_tanh", "gelu_10", "quick_gelu", "relu", "relu2", "relu6", "leaky_relu",
    "sigmoid", "tanh", "mish", "laplace", "linear",
)  # fmt: skip
# Apple's Hugging Face code builds RMSNorm whatever this says; CoreNet's would build another norm
# (with a bias the checkpoint would then hold), so any other value is refused rather than guessed.
NORMALIZATION_NAMES = ("rms_norm",)
_REQUIRED = ("num_transformer_layers", "model_dim", "head_dim", "vocab_size")


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor``, never more than 10% below ``v`` (Apple's rule)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def _layerwise(multipliers: Any, num_layers: int, name: str) -> list[float]:
    """Expand a multiplier spec (number, (lo, hi) pair, per-layer list) to one value per layer."""
    if isinstance(multipliers, Number):
        return [float(multipliers)] * num_layers
    if isinstance(multipliers, (list, tuple)):
        if len(multipliers) == 2 and num_layers != 2:
            lo, hi = multipliers
            return [round(float(v), 2) for v in np.linspace(lo, hi, num=num_layers, dtype=float)]
        if len(multipliers) == num_layers:
            return [float(v) for v in multipliers]
    raise ConfigError(
        f"config field '{name}' must be a number, a (min, max) pair or one value per layer "
        f"({num_layers} layers); got {multipliers!r}"
    )


@dataclass
class ModelArgs:
    """OpenELM hyper-parameters with Apple's ``config.json`` field names and defaults.

    A field a config leaves out takes the default of Apple's ``OpenELMConfig`` (the same as
    CoreNet's ``GPTConfig``), so a config means what it means to Apple's code. Fields with no
    effect on the numbers (``initializer_range``, ``use_cache``, ``torch_dtype``…) are ignored;
    ``rope_max_length`` only sizes Apple's precomputed RoPE table, which grows on demand.
    """

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    vocab_size: int = 32000
    num_query_heads: list[int] = field(default_factory=list)
    num_kv_heads: list[int] = field(default_factory=list)
    ffn_multipliers: Any = 4.0
    qkv_multipliers: Any = 1.0
    num_gqa_groups: int = 1
    ffn_dim_divisor: int = 256
    ffn_with_glu: bool = True
    activation_fn_name: str = "swish"
    normalization_layer_name: str = "rms_norm"
    normalize_qk_projections: bool = False
    share_input_output_layers: bool = False
    rms_norm_eps: float = 1e-6
    rope_freq_constant: float = 10000.0
    rope_max_length: int = 4096
    max_context_length: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = MODEL_TYPE
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelArgs:
        """Build from an HF-style ``config.json`` dict; unknown keys are ignored.

        Head counts are derived from ``qkv_multipliers`` as Apple's code derives them (it ignores
        stored ``num_query_heads``/``num_kv_heads``); stored lists that disagree are refused, and
        used as they are only when the config has no ``qkv_multipliers`` (mlx-lm style folders).

        Raises:
            ConfigError: unknown ``model_type``, a missing required field, or inconsistent lists.
        """
        model_type = params.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"config field 'model_type' is {model_type!r}, but this tool only runs "
                f"'{MODEL_TYPE}' models (Apple OpenELM); use mlx-lm for other architectures"
            )
        missing = [k for k in _REQUIRED if k not in params]
        if missing:
            raise ConfigError(
                f"config is missing required field(s) {', '.join(missing)}; an OpenELM "
                "config.json needs num_transformer_layers, model_dim, head_dim and vocab_size"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in names}
        if isinstance(kwargs.get("quantization"), dict):
            kwargs["quantization"] = dict(kwargs["quantization"])  # never share the caller's dict
        args = cls(**kwargs)
        args._derive_and_validate(qkv_given="qkv_multipliers" in params)
        return args

    @classmethod
    def from_preset(cls, size: str, **overrides: Any) -> ModelArgs:
        """Build one of Apple's released sizes: ``270M``, ``450M``, ``1_1B`` or ``3B``."""
        key = size.upper().removeprefix("OPENELM-").removesuffix("-INSTRUCT").replace(".", "_")
        if key not in PRESETS:
            raise ConfigError(f"unknown OpenELM size {size!r}; choose one of {', '.join(PRESETS)}")
        layers, dim, head_dim = PRESETS[key]
        params = {
            **_PRESET_COMMON,
            "num_transformer_layers": layers,
            "model_dim": dim,
            "head_dim": head_dim,
            **overrides,
        }
        return cls.from_dict(params)

    @classmethod
    def from_corenet(cls, section: dict[str, Any]) -> ModelArgs:
        """Build from CoreNet's ``model.language_modeling.general_gpt`` YAML section.

        CoreNet names a preset (``model_name: OpenELM-270M``) or spells out the same fields as HF.
        Its ``vocab_size`` (32128: 32000 tokens + padding index 32000, rounded up for hardware) is
        not the vocabulary the tokenizer produces, so the MLX model keeps 32000 rows.
        """
        fields = {k: v for k, v in section.items() if k not in ("model_name", "vocab_size")}
        fields.pop("padding_index", None)
        name = section.get("model_name")
        if name:
            return cls.from_preset(str(name), **fields)
        return cls.from_dict({"vocab_size": 32000, **fields})  # GPTConfig's defaults for the rest

    def _derive_and_validate(self, qkv_given: bool = True) -> None:
        check_fields(self)
        n = self.num_transformer_layers
        self._check_names()
        self._derive_heads(qkv_given)
        self.ffn_multipliers = _layerwise(self.ffn_multipliers, n, "ffn_multipliers")
        self.num_query_heads = [int(h) for h in self.num_query_heads]
        self.num_kv_heads = [int(h) for h in self.num_kv_heads]
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            got = len(getattr(self, name))
            if got != n:
                raise ConfigError(
                    f"config field '{name}' has {got} entries but num_transformer_layers is {n}; "
                    "give one value per layer"
                )
        for name in ("num_query_heads", "num_kv_heads"):  # derived ones too
            for i, h in enumerate(getattr(self, name)):
                _check_int(f"{name}[{i}]", h, 1, 2**16)
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if q <= 0 or kv <= 0 or q % kv:
                raise ConfigError(
                    f"layer {i}: num_query_heads={q} must be a positive multiple of "
                    f"num_kv_heads={kv} (grouped-query attention)"
                )

    def _check_names(self) -> None:
        for name, allowed in (
            ("activation_fn_name", ACTIVATION_NAMES),
            ("normalization_layer_name", NORMALIZATION_NAMES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"config field '{name}' is {value!r}, which this tool cannot compute exactly; "
                    f"supported: {', '.join(allowed)}"
                )

    def _derive_heads(self, qkv_given: bool) -> None:
        """Per-layer head counts, as Apple's ``OpenELMConfig.__post_init__`` computes them."""
        stored_q, stored_kv = list(self.num_query_heads), list(self.num_kv_heads)
        if stored_q and not qkv_given:  # mlx-lm style: lists only, no multipliers
            self.num_kv_heads = stored_kv or [q // self.num_gqa_groups for q in stored_q]
            return
        qkv = _layerwise(self.qkv_multipliers, self.num_transformer_layers, "qkv_multipliers")
        divisor = self.head_dim * self.num_gqa_groups
        q_dims = [make_divisible(self.model_dim * m, divisor=divisor) for m in qkv]
        self.num_query_heads = [d // self.head_dim for d in q_dims]
        self.num_kv_heads = [q // self.num_gqa_groups for q in self.num_query_heads]
        for name, stored in (("num_query_heads", stored_q), ("num_kv_heads", stored_kv)):
            derived = getattr(self, name)
            if stored and [int(v) for v in stored] != derived:
                raise ConfigError(
                    f"config field '{name}' is {stored} but qkv_multipliers="
                    f"{self.qkv_multipliers!r} and num_gqa_groups={self.num_gqa_groups} give "
                    f"{derived} (Apple's code uses the latter); fix or remove '{name}'"
                )

    @property
    def ffn_dims(self) -> list[int]:
        """Per-layer FFN hidden width (each of gate and up): ``make_divisible(m·dim, divisor)``."""
        return [
            make_divisible(m * self.model_dim, divisor=self.ffn_dim_divisor)
            for m in self.ffn_multipliers
        ]

    def num_parameters(self) -> int:
        """Parameter count as Apple reports it (tied embeddings counted once)."""
        dim, hd = self.model_dim, self.head_dim
        total = self.vocab_size * dim + dim  # embeddings + final norm
        if not self.share_input_output_layers:
            total += self.vocab_size * dim
        for q, kv, ffn in zip(self.num_query_heads, self.num_kv_heads, self.ffn_dims):
            total += dim * (q + 2 * kv) * hd + q * hd * dim  # qkv_proj + out_proj
            total += (2 if self.normalize_qk_projections else 0) * hd + 2 * dim  # norms
            total += dim * ffn * (2 if self.ffn_with_glu else 1) + ffn * dim  # proj_1 + proj_2
        return total

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` form (HF field names, per-layer lists spelled out)."""
        out = dataclasses.asdict(self)
        out["qkv_multipliers"] = (
            list(self.qkv_multipliers)
            if isinstance(self.qkv_multipliers, (list, tuple))
            else self.qkv_multipliers
        )
        if out["quantization"] is None:
            del out["quantization"]
        out["architectures"] = ["OpenELMForCausalLM"]
        return out
