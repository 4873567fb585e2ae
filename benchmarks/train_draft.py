"""Pretrain a small OpenELM on Shakespeare, to draft for the trained tiny model (bench_decoding).

Apple's model card names a draft model as the second speed-up after prompt lookup, and the
project's decoding issue asks for the 270M-drafts-a-bigger-model path side by side. No trained
OpenELM bigger than ``../shared/models/openelm-tiny-shakespeare`` is available offline, and
random weights accept nothing of each other's drafts, so this script makes the closest honest
stand-in: a draft for the trained tiny model, trained the way that model was (its README: the
same corpus, AdamW β 0.9/0.95, weight decay 0.1 on matrices, peak LR 3e-3, 80 warm-up steps,
cosine to 5%, gradient clip 1.0, 8 × 256 tokens per step, seed 0) but half its width and layers
(2 layers, model_dim 128, head_dim 32: 4.5 M parameters, most of them the 32000 × 128 tied
embedding), with MLX and this project's own loss. It is written in float32 (``--dtype``): on
MLX's CPU backend here a float16 draft step took 13.4 ms and a float32 one 3.7 ms (bfloat16
6.8 ms); on a GPU float16 would be the choice.

Prints the held-out perplexity of both models on ``valid.jsonl`` windows and how often the
draft's greedy next token is the target's (what speculative decoding's acceptance follows).

    python benchmarks/train_draft.py /tmp/draft --steps 300   # 4 s a step on 2 CPU cores
    python benchmarks/bench_decoding.py --models tiny-shakespeare --draft /tmp/draft
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.optimizers import clip_grad_norm
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_openelm.config import ModelArgs
from mlx_openelm.folder import write_model_folder
from mlx_openelm.lora.compute import loss_sums
from mlx_openelm.lora.optim import build_optimizer, make_schedule
from mlx_openelm.model import Model
from mlx_openelm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "data" / "llama2-tokenizer" / "tokenizer.model"
DATA = SHARED / "data" / "shakespeare"
TARGET = SHARED / "models" / "openelm-tiny-shakespeare"
WINDOW = 256

DRAFT_SHAPE = {  # the tiny target's recipe (its config.json) at half the layers and width
    "num_transformer_layers": 2,
    "model_dim": 128,
    "head_dim": 32,
    "num_gqa_groups": 4,
    "qkv_multipliers": [0.5, 1.0],
    "ffn_multipliers": [0.5, 4.0],
    "ffn_dim_divisor": 64,
    "vocab_size": 32000,
    "max_context_length": 2048,
    "normalize_qk_projections": True,
    "share_input_output_layers": True,
}


def token_stream(path: Path, tok: Tokenizer) -> np.ndarray:
    """BOS + text + EOS per chunk, concatenated (how the target was trained)."""
    ids: list[int] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        ids += [1, *tok.encode(json.loads(line)["text"], add_bos=False), 2]
    return np.array(ids, dtype=np.int32)


def windows(ids: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` non-overlapping windows of WINDOW + 1 tokens (inputs and targets)."""
    count = min(n, (len(ids) - 1) // WINDOW)
    return np.stack([ids[i * WINDOW : i * WINDOW + WINDOW + 1] for i in range(count)])


def perplexity_and_agreement(model: nn.Module, target: nn.Module | None, rows: np.ndarray):
    total, count, agree = 0.0, 0, 0
    for row in rows:
        x = mx.array(row[None, :-1])
        y = mx.array(row[None, 1:])
        logits = model(x).astype(mx.float32)
        total += nn.losses.cross_entropy(logits, y, reduction="sum").item()
        count += y.size
        if target is not None:
            agree += (mx.argmax(logits, -1) == mx.argmax(target(x), -1)).sum().item()
    return math.exp(total / count), agree / count


def train(out: Path, steps: int, batch: int, seed: int, dtype: str) -> None:
    tok = Tokenizer(TOKENIZER)
    train_ids = token_stream(DATA / "train.jsonl", tok)
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    args = ModelArgs.from_dict(DRAFT_SHAPE)
    model = Model(args)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    cosine = make_schedule("cosine", 3e-3, steps, warmup=min(80, steps - 1))  # 80, as the target

    def rate(step):  # cosine to 5% of the peak, as the target's run
        return 0.05 * 3e-3 + 0.95 * cosine(step)

    opt = build_optimizer("adamw", rate, weight_decay=0.0)
    opt.betas = [0.9, 0.95]
    decay = {k for k, v in tree_flatten(model.parameters()) if v.ndim == 2}  # matrices only

    def loss_fn(m: nn.Module, x: mx.array, y: mx.array) -> mx.array:
        s, n = loss_sums(m, x, y, mx.ones(y.shape), fused_head=False)
        return s / n

    grad_fn = nn.value_and_grad(model, loss_fn)
    print(f"draft: {n_params / 1e6:.2f} M parameters, {len(train_ids)} training tokens", flush=True)
    tic = time.perf_counter()
    for step in range(steps):
        starts = rng.integers(0, len(train_ids) - WINDOW - 1, size=batch)
        rows = np.stack([train_ids[s : s + WINDOW + 1] for s in starts])
        x, y = mx.array(rows[:, :-1]), mx.array(rows[:, 1:])
        loss, grads = grad_fn(model, x, y)
        grads, _ = clip_grad_norm(grads, 1.0)
        lr = rate(mx.array(step))
        params = dict(tree_flatten(model.parameters()))
        opt.update(model, grads)
        # decoupled weight decay 0.1 on matrices only (AdamW here decays nothing: see above)
        model.update(_decayed(model, params, decay, 0.1 * lr))
        mx.eval(model.parameters(), opt.state, loss)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - tic:.0f} s)",
                  flush=True)  # fmt: skip
    model.update(tree_map(lambda v: v.astype(getattr(mx, dtype)), model.parameters()))
    write_model_folder(out, args.to_dict(), tree_flatten(model.parameters()), tok)
    report(out)


def _decayed(model: nn.Module, before: dict, keys: set[str], rate: mx.array):
    """Parameters after decoupled weight decay: ``p - rate * p_before`` for ``keys``."""
    now = dict(tree_flatten(model.parameters()))
    return tree_unflatten([(k, now[k] - rate * before[k]) for k in keys])


def report(draft_dir: Path) -> None:
    import mlx_openelm
    from mlx_openelm.convert import convert

    tok = Tokenizer(TOKENIZER)
    rows = windows(token_stream(DATA / "valid.jsonl", tok), 48)
    target_dir = draft_dir.parent / (draft_dir.name + "-target")
    if not target_dir.exists():
        convert(TARGET, target_dir, tokenizer=TOKENIZER, dtype="float32")
    target, _ = mlx_openelm.load(target_dir)
    draft, _ = mlx_openelm.load(draft_dir)
    ppl_t, _ = perplexity_and_agreement(target, None, rows)
    ppl_d, agree = perplexity_and_agreement(draft, target, rows)
    print(f"valid perplexity (48 windows of {WINDOW}): target {ppl_t:.1f}, draft {ppl_d:.1f}; "
          f"draft's greedy token is the target's at {agree:.1%} of positions")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the draft's MLX folder")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.report_only:
        report(args.out)
    else:
        train(args.out, args.steps, args.batch, args.seed, args.dtype)


if __name__ == "__main__":
    main()
