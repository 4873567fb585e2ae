"""What every source format becomes: a :class:`Checkpoint`, renamed by data and checked once.

A source module (``hf``, ``corenet``) opens its files into a ``Checkpoint``: the config, the raw
tensors (lazy, under the source's own names), the source's rename table and a record of where it
came from. :func:`prepare_tensors` then applies the table with one function, checks every expected
name and shape against the model built from the config, and raises once listing *all* problems.
:func:`average_checkpoints` merges several checkpoints of one format into their uniform mean.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx.utils import tree_flatten

from mlx_openelm.config import ModelArgs
from mlx_openelm.errors import ConfigError, WeightsError
from mlx_openelm.mismatch import group_names, tensor_mismatches
from mlx_openelm.model import Model

from .tensors import AveragedTensor, TensorRef

# A rename rule: regex matched at the start of a source name -> replacement (``re.sub`` syntax),
# or None to drop the tensor. The first matching rule wins; names no rule matches are kept as is.
Rule = tuple[str, str | None]


@dataclass
class Checkpoint:
    """A source checkpoint, opened lazily (no tensor read yet).

    Attributes:
        format: ``"hf"`` or ``"corenet"``.
        args: the model configuration.
        tensors: source name -> lazy tensor.
        rules: the format's rename table (source names -> our names).
        source: what to record in ``config.json`` about where the weights came from.
        name: a label for messages and instruct detection (repo id, folder or file name).
        folder: the HF folder, where a tokenizer or generation config may be found.
        generation_config: the source's ``generation_config.json``, if any.
        files: the weight files (hashed into the source record).
        chat_template: a chat template the weights carry (a GGUF's), if any.
        vocab: the token pieces the weights carry (a GGUF's), checked against the tokenizer.
    """

    format: str
    args: ModelArgs
    tensors: dict[str, TensorRef]
    rules: list[Rule]
    source: dict[str, Any]
    name: str
    folder: Path | None = None
    generation_config: dict[str, Any] | None = None
    files: list[Path] = field(default_factory=list)
    chat_template: str | None = None
    vocab: list[str] | None = None


def rename(name: str, rules: Iterable[Rule]) -> str | None:
    """Our name for a source tensor name (None: drop it), by the first rule that matches."""
    for pattern, replacement in rules:
        if re.match(pattern, name):
            return None if replacement is None else re.sub(pattern, replacement, name, count=1)
    return name


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter the model needs, with its shape, in the model's order.

    The model is built lazily (MLX does not materialise the random init until evaluated), so
    this costs no memory even for 3B.
    """
    model = Model(args)
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def prepare_tensors(cp: Checkpoint) -> dict[str, TensorRef]:
    """Rename ``cp``'s tensors, check them against the config, order them like the model.

    Raises:
        WeightsError: missing, unexpected or mis-shaped tensors, or two source tensors renamed to
            the same name (every problem listed, in one message).
    """
    renamed: dict[str, TensorRef] = {}
    origin: dict[str, str] = {}
    clashes = []
    for src, ref in cp.tensors.items():
        ours = rename(src, cp.rules)
        if ours is None:
            continue
        if ours in renamed:
            clashes.append(f"{origin[ours]} and {src} -> {ours}")
        renamed[ours], origin[ours] = ref, src
    if clashes:
        raise WeightsError(f"{cp.name}: several tensors map to one name: {'; '.join(clashes)}")
    if cp.args.share_input_output_layers:
        # The output head is the embedding (tied); some exports still carry a copy.
        renamed.pop("lm_head.weight", None)
    expected = expected_shapes(cp.args)
    check_tensors(expected, renamed, cp.name, _hint(cp))
    return {k: renamed[k] for k in expected}


def _hint(cp: Checkpoint) -> str:
    if any(".base_layer." in k or "lora_" in k for k in cp.tensors):
        return (
            "this looks like a LoRA training checkpoint (base_layer / lora_* tensors): merge the "
            "adapters into the base weights first, or convert the base model"
        )
    if cp.format == "corenet":
        return (
            "check that --config-yaml / --size describes the model this checkpoint was "
            "trained as (and that it is a CoreNet OpenELM checkpoint)"
        )
    return "check that config.json belongs to these weights (same model size and files)"


def check_tensors(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, TensorRef],
    where: str,
    hint: str,
) -> None:
    """Compare names and shapes; raise once, listing every missing, extra and mis-shaped tensor.

    Raises:
        WeightsError: with all problems; per-layer names are grouped (``layers.{0-15}.…``).
    """
    problems = tensor_mismatches(expected, {k: t.shape for k, t in found.items()})
    if problems:
        raise WeightsError(
            f"weights in {where} do not fit the config: {'; '.join(problems)}; {hint}"
        )


def average_checkpoints(cps: Sequence[Checkpoint]) -> Checkpoint:
    """The uniform mean of several checkpoints of one format, computed lazily tensor by tensor.

    Raises:
        ConfigError: the checkpoints have different formats or configs.
        WeightsError: they disagree on tensor names or shapes (each difference named).
    """
    first = cps[0]
    for cp in cps[1:]:
        if cp.format != first.format:
            raise ConfigError(
                f"cannot average a {first.format} checkpoint ({first.name}) with a {cp.format} "
                f"one ({cp.name}); average checkpoints of one training run"
            )
        if cp.args.to_dict() != first.args.to_dict():
            raise ConfigError(
                f"cannot average {first.name} and {cp.name}: their configs differ; average "
                "checkpoints of one model"
            )
    _check_same_layout(cps)
    tensors = {k: AveragedTensor([cp.tensors[k] for cp in cps]) for k in first.tensors}
    source = {"averaged": len(cps), "checkpoints": [cp.source for cp in cps]}
    return Checkpoint(
        format=first.format,
        args=first.args,
        tensors=dict(tensors),
        rules=first.rules,
        source=source,
        name=f"mean of {len(cps)} checkpoints ({first.name}, ...)",
        folder=first.folder,
        generation_config=first.generation_config,
        files=[f for cp in cps for f in cp.files],
    )


def _check_same_layout(cps: Sequence[Checkpoint]) -> None:
    first, problems = cps[0], []
    for cp in cps[1:]:
        only_first = [k for k in first.tensors if k not in cp.tensors]
        only_this = [k for k in cp.tensors if k not in first.tensors]
        shapes = [
            f"{k} ({tuple(first.tensors[k].shape)} vs {tuple(cp.tensors[k].shape)})"
            for k in first.tensors
            if k in cp.tensors and tuple(first.tensors[k].shape) != tuple(cp.tensors[k].shape)
        ]
        if only_first:
            problems.append(f"only in {first.name}: {group_names(only_first)}")
        if only_this:
            problems.append(f"only in {cp.name}: {group_names(only_this)}")
        if shapes:
            problems.append(
                f"shapes differ between {first.name} and {cp.name}: {', '.join(shapes)}"
            )
    if problems:
        raise WeightsError(
            "cannot average checkpoints that disagree on tensors: "
            + "; ".join(problems)
            + ". Average checkpoints of one training run (same model and size)"
        )
