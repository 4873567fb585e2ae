"""The fine-tuning loop: packed batches, schedules, validation, checkpoints, resume, data parallel.

Determinism (so ``--resume`` continues the *same* curve): the row order of epoch ``e`` is
``epoch_order(rows, seed, e, row lengths, rows per step)``; the dropout stream of micro-batch
``m`` of step ``k`` is re-seeded from ``(seed, k, m, rank)``; the optimizer state (with its step
counter, which drives the learning-rate schedule) is checkpointed. Step ``k`` depends only on
checkpointed state.

The loss is token-weighted over the whole step: gradients of *summed* token losses are added over
micro-batches (``grad_accum``) and ranks (``mx.distributed.all_sum``) and divided once by the total
number of trained tokens, so two ranks with half a batch each make the same update as one process
with the whole batch. Rank 0 writes every file and alone calls ``callback``. The allocator cache
is left alone between steps (mlx-lm clears it every step).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .. import fastmath
from ..errors import ConfigError, DataError, TrainingError
from ..folder import atomic_write
from .adapters import (
    ADAPTER_FILE,
    AdapterSpec,
    apply_adapters,
    check_adapter_size,
    resolve_num_layers,
    resolve_targets,
    save_adapters,
)
from .batching import (
    Batch,
    auto_pack_length,
    epoch_order,
    longest_example,
    make_batch,
    plan_rows,
    row_lengths,
)
from .checkpoint import (
    CHECKPOINT_DIR,
    check_adapter_folder,
    check_resume,
    load_checkpoint,
    save_checkpoint,
)
from .compute import all_sum, batch_arrays, evaluate, loss_sums, set_grad_checkpoint
from .config import (
    DEFAULT_ITERS,
    RESUMABLE_CHANGES,
    Callback,
    EvalReport,
    SaveReport,
    StartReport,
    StepReport,
    TrainConfig,
    TrainResult,
)
from .data import Dataset
from .metrics import MetricsLog, perplexity
from .optim import build_optimizer, make_schedule


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, np.uint32)[0])


class Trainer:
    """One fine-tuning run; :func:`train` is the entry point."""

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        valid_set: Dataset | None,
        spec: AdapterSpec,
        config: TrainConfig,
        adapter_path: str | Path,
        base_model: dict[str, Any],
        callback: Callback | None = None,
    ):
        self.model, self.train_set, self.valid_set = model, train_set, valid_set
        self.base_model = base_model
        if config.pack is None:
            config = replace(config, pack=train_set.format == "text")
        if config.pack and config.pack_length is None:
            length = auto_pack_length(train_set.examples, config.max_seq_len)
            config = replace(config, pack_length=length)
        self.spec, self.cfg, self.path = spec, config, Path(adapter_path)
        self.world = mx.distributed.init()
        self.rank, self.size = self.world.rank(), self.world.size()
        self.callback = callback if self.rank == 0 else None
        self._check_config()
        self.capacity = config.pack_length if config.pack else config.max_seq_len
        self.rows = plan_rows(train_set.examples, self.capacity, config.pack)
        self.row_lengths = row_lengths(train_set.examples, self.rows)
        self.rows_per_step = config.batch_size * config.grad_accum  # grouped by length together
        self.batches_per_epoch = len(self.rows) // config.batch_size
        self.steps_per_epoch = self.batches_per_epoch // config.grad_accum
        self._check_sizes()
        epochs_total = (config.epochs or 0) * self.steps_per_epoch
        self.total = config.iters or epochs_total or DEFAULT_ITERS
        schedule = make_schedule(
            config.lr_schedule, config.learning_rate, self.total, config.warmup
        )
        self.optimizer = build_optimizer(config.optimizer, schedule, config.weight_decay)
        self.identity = {
            "hyperparameters": self._curve_settings(),
            "adapter": asdict(spec),
            "model": {k: v for k, v in base_model.items() if k != "path"},
            "data": {
                "train_sha256": train_set.sha256,
                "train_examples": len(train_set),
                "valid_sha256": valid_set.sha256 if valid_set else None,
            },
        }
        self.step, self.evals_since_best = 0, 0
        self.best: tuple[float, int] | None = None
        self.order_epoch, self.order = -1, np.zeros(0, np.int64)
        self.last_checkpoint: int | None = None

    def _check_config(self) -> None:
        self.spec.validate()
        resolve_targets(self.model, self.spec.targets)
        resolve_num_layers(self.model, self.spec.num_layers)
        check_adapter_size(self.model, self.spec)
        cfg = self.cfg
        cfg.validate()
        if (cfg.keep_best or cfg.early_stop) and self.valid_set is None:
            raise ConfigError("--keep-best and --early-stop need validation data (valid.jsonl)")
        longest = longest_example(self.train_set.examples)
        if cfg.pack and cfg.pack_length < longest:
            raise ConfigError(
                f"--pack-length {cfg.pack_length} is shorter than the longest training example "
                f"({longest} tokens); raise it, or truncate examples with --max-seq-len "
                f"{cfg.pack_length}"
            )
        if cfg.batch_size % self.size:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} must be divisible by the {self.size} processes"
            )

    def _check_sizes(self) -> None:
        if self.batches_per_epoch >= self.cfg.grad_accum:
            return
        what = "packed sequences" if self.cfg.pack else "examples"
        raise DataError(
            f"--batch-size {self.cfg.batch_size} (× --grad-accum {self.cfg.grad_accum}) is larger "
            f"than the training data: {self.train_set.path} makes only {len(self.rows)} {what} "
            f"of up to {self.capacity} tokens; lower --batch-size"
            + (" or --pack-length" if self.cfg.pack else "")
        )

    def _curve_settings(self) -> dict[str, Any]:
        values = {k: v for k, v in asdict(self.cfg).items() if k not in RESUMABLE_CHANGES}
        values.update(iters=self.total, epochs=None, grad_checkpoint=None)
        values["processes"] = self.size
        if self.cfg.lr_schedule == "constant":
            del values["iters"]  # the rate does not depend on the run's length: it may be extended
        return values

    def _report(self, event: object) -> None:
        if self.callback is not None:
            self.callback(event)

    # -- data ------------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self.order_epoch:
            self.order_epoch, self.order = (
                epoch,
                epoch_order(
                    len(self.rows), self.cfg.seed, epoch, self.row_lengths, self.rows_per_step
                ),
            )
        return self.order

    def _batch(self, index: int) -> Batch:
        """This rank's share of global batch ``index`` (counted from the start of training)."""
        epoch, k = divmod(index, self.batches_per_epoch)
        b = self.cfg.batch_size
        picked = self._order(epoch)[k * b : (k + 1) * b]
        rows = [self.rows[i] for i in picked]
        batch = make_batch(
            self.train_set.examples, rows[self.rank :: self.size], self.capacity, self.cfg.pack,
        )  # fmt: skip
        useful = sum(self.row_lengths[i] for i in picked)  # the whole batch, all ranks
        return Batch(batch.inputs, batch.targets, batch.weights, batch.segments, useful)

    # -- setup -----------------------------------------------------------------------------

    def setup(self, resume: bool = False, force: bool = False) -> None:
        """Add the adapters, build the optimizer, and restore a checkpoint or clear the folder.

        Raises:
            OutputExistsError, ConfigError: the folder exists (no --resume/--force), or the
                checkpoint was made with other settings.
        """
        check_adapter_folder(self.path, resume, force)
        mx.random.seed(self.cfg.seed)
        self.adapter_config = apply_adapters(self.model, self.spec)
        self.adapter_config.update(base_model=self.base_model, training=self.cfg)
        self.optimizer.init(self.model.trainable_parameters())
        if resume:
            self._restore()
        elif self.path.exists() and self.rank == 0:  # --force (checked above)
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        self.metrics = MetricsLog(self.path / "metrics.jsonl", enabled=self.rank == 0)
        self.metrics.truncate(self.step)

    def _restore(self) -> None:
        adapters, opt_state, state = load_checkpoint(self.path)
        check_resume(state["identity"], self.identity)
        if state["step"] > self.total:
            raise ConfigError(
                f"--resume: the checkpoint is at step {state['step']}, past the {self.total} "
                "steps asked for; give a larger --iters to train on"
            )
        self.model.load_weights(list(adapters.items()), strict=False)
        self.optimizer.state = opt_state
        self.optimizer.init(self.model.trainable_parameters())
        self.step, self.last_checkpoint = state["step"], state["step"]
        self.best = tuple(state["best"]) if state.get("best") else None
        self.evals_since_best = state["evals_since_best"]
        order = np.asarray(state["data_order"], np.int64)
        if not np.array_equal(order, self._order(state["epoch"])):
            raise ConfigError(f"--resume: the checkpoint's data order does not fit {self.path}")

    # -- the loop --------------------------------------------------------------------------

    def _compile(self) -> tuple:
        model, optimizer, clip = self.model, self.optimizer, self.cfg.grad_clip
        value_and_grad = nn.value_and_grad(model, loss_sums)

        def grads(inputs, targets, weights, segments):
            (total, count), g = value_and_grad(model, inputs, targets, weights, segments)
            return total, count, g

        def update(g, count):
            g = tree_map(lambda x: x / count, g)
            if clip:
                g, _ = optim.clip_grad_norm(g, clip)
            optimizer.update(model, g)

        # value_and_grad swaps traced parameters into the model: they must be outputs too.
        state = [model.state, mx.random.state]
        grads_fn = mx.compile(grads, inputs=state, outputs=state)
        state = [model.state, optimizer.state]
        return grads_fn, mx.compile(update, inputs=state, outputs=state)

    def _train_step(self, grads_fn, update_fn) -> tuple[float, int]:
        total = count = acc = None
        useful = 0
        for micro in range(self.cfg.grad_accum):
            batch = self._batch(self.step * self.cfg.grad_accum + micro)
            mx.random.seed(_step_seed(self.cfg.seed, self.step, micro, self.rank))
            s, n, g = grads_fn(*batch_arrays(batch))
            useful += batch.num_tokens
            if acc is None:
                total, count, acc = s, n, g
            else:
                total, count, acc = total + s, count + n, tree_map(mx.add, acc, g)
            mx.eval(total, count, acc)
        (total, count), acc = all_sum(self.world, [total, count], acc)
        loss = total.item() / count.item()
        if not math.isfinite(loss):
            self._diverged(loss)
        update_fn(acc, count)
        mx.eval(self.model.state, self.optimizer.state)
        return loss, useful

    def _diverged(self, loss: float) -> None:
        where = (
            f"the last good checkpoint (step {self.last_checkpoint}) is in "
            f"{self.path / CHECKPOINT_DIR}"
            if self.last_checkpoint is not None
            else "no checkpoint had been saved yet"
        )
        raise TrainingError(
            f"training loss became {loss} at step {self.step + 1}, so training stopped; {where}. "
            "Lower --learning-rate, set --grad-clip, or check the data, then train again"
        )

    def run(self) -> TrainResult:
        """Train from ``self.step`` to the end (or an early stop); returns the summary."""
        if self.cfg.grad_checkpoint:
            set_grad_checkpoint(self.model, True)
        try:
            return self._loop()
        finally:
            set_grad_checkpoint(self.model, False)

    def _loop(self) -> TrainResult:
        grads_fn, update_fn = self._compile()
        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        self._report(StartReport(
            total_steps=self.total, start_step=self.step, steps_per_epoch=self.steps_per_epoch,
            rows=len(self.rows), trainable_parameters=trainable, world_size=self.size,
            row_length=self.cfg.pack_length if self.cfg.pack else None,
        ))  # fmt: skip
        extra = {"pack": self.cfg.pack, "capacity": self.capacity, "rank": self.rank}
        result = TrainResult(adapter_path=self.path, steps=self.total, extra=extra)
        self.model.train()
        if self.valid_set is not None and self.step == 0:
            self._validate()
        start, first, stop = time.perf_counter(), self.step, False
        while self.step < self.total and not stop:
            tic = time.perf_counter()
            loss, tokens = self._train_step(grads_fn, update_fn)
            self.step += 1
            now = time.perf_counter()
            result.tokens += tokens
            self._log_step(loss, tokens, now - tic, now - start, self.step - first)
            result.train_loss = loss
            if self.valid_set is not None and (
                self.step % self.cfg.val_every == 0 or self.step == self.total
            ):
                result.val_loss, stop = self._validate()
            if self.step % self.cfg.save_every == 0 or self.step == self.total or stop:
                self._save()
        result.steps, result.stopped_early = self.step, stop
        result.tokens_per_second = result.tokens / max(time.perf_counter() - start, 1e-9)
        result.peak_memory_gb = mx.get_peak_memory() / 1e9
        if self.best is not None:
            result.best_val_loss, result.best_step = self.best
        self._finish()
        return result

    def _log_step(self, loss: float, tokens: int, dt: float, elapsed: float, done: int) -> None:
        lr = float(self.optimizer.learning_rate.item())
        peak = mx.get_peak_memory() / 1e9
        epoch = (self.step - 1) * self.cfg.grad_accum // self.batches_per_epoch  # of this step
        self.metrics.log({
            "step": self.step, "epoch": epoch, "train_loss": loss, "learning_rate": lr,
            "tokens": tokens, "tokens_per_second": tokens / dt, "peak_memory_gb": peak,
        })  # fmt: skip
        eta = elapsed / done * (self.total - self.step)
        self._report(StepReport(
            step=self.step, total_steps=self.total, epoch=epoch, loss=loss, learning_rate=lr,
            tokens=tokens, tokens_per_second=tokens / dt, peak_memory_gb=peak, elapsed_s=elapsed,
            eta_s=eta,
        ))  # fmt: skip

    def _validate(self) -> tuple[float, bool]:
        """Validation loss now; keeps the best adapters; returns (loss, early-stop now)."""
        cfg = self.cfg
        loss, tokens = evaluate(
            self.model, self.valid_set, cfg.batch_size, self.capacity, cfg.pack, cfg.val_batches
        )
        improved = self.best is None or loss < self.best[0]
        if improved:
            self.best, self.evals_since_best = (loss, self.step), 0
            if cfg.keep_best and self.rank == 0:
                path = save_adapters(self.model, self.path / "best", self.adapter_config)
                self._report(SaveReport(step=self.step, kind="best", path=path))
        else:
            self.evals_since_best += 1
        ppl = perplexity(loss)
        self.metrics.log({"step": self.step, "val_loss": loss, "val_ppl": ppl})
        report = EvalReport(
            step=self.step, split="valid", loss=loss, perplexity=ppl, tokens=tokens, best=improved
        )
        self._report(report)
        return loss, bool(cfg.early_stop and self.evals_since_best >= cfg.early_stop)

    def _save(self) -> None:
        self.last_checkpoint = self.step
        if self.rank != 0:
            return
        epoch = self.step * self.cfg.grad_accum // self.batches_per_epoch
        state = {
            "step": self.step,
            "epoch": epoch,
            "batch_in_epoch": self.step * self.cfg.grad_accum % self.batches_per_epoch,
            "data_order": self._order(epoch).tolist(),
            "rng": {"scheme": "mx.random.seed(SeedSequence([seed, step, micro, rank]))",
                    "seed": self.cfg.seed},
            "best": list(self.best) if self.best else None,
            "evals_since_best": self.evals_since_best,
            "identity": self.identity,
        }  # fmt: skip
        path = save_checkpoint(self.path, self.model, self.optimizer, state)
        save_adapters(self.model, self.path, self.adapter_config)
        self._report(SaveReport(step=self.step, kind="checkpoint", path=path))

    def _finish(self) -> None:
        """With --keep-best the folder's adapters become the best ones (the last stay in
        checkpoint/)."""
        if self.rank != 0:
            return
        best_file = self.path / "best" / ADAPTER_FILE
        if self.cfg.keep_best and best_file.is_file():
            atomic_write(self.path / ADAPTER_FILE, lambda tmp: shutil.copyfile(best_file, tmp))
        self._report(SaveReport(step=self.step, kind="final", path=self.path))


def train(
    model: nn.Module,
    train_set: Dataset,
    valid_set: Dataset | None,
    spec: AdapterSpec,
    config: TrainConfig,
    adapter_path: str | Path,
    base_model: dict[str, Any] | None = None,
    resume: bool = False,
    force: bool = False,
    callback: Callback | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place and write the adapter folder.

    Args:
        model: the base model (float or quantized: QLoRA); gains the adapter layers.
        train_set, valid_set: encoded data (:func:`mlx_openelm.lora.data.encode_file`).
        spec: adapter type, rank, alpha, dropout, targets, layers.
        config: optimisation, schedule, packing, validation and checkpoint settings.
        adapter_path: the output folder (``adapters.safetensors``, ``adapter_config.json``,
            ``metrics.jsonl``, ``checkpoint/``, ``best/``).
        base_model: identifies the base model in the adapter config (path, shape).
        resume: continue from ``adapter_path/checkpoint`` (same settings required).
        force: replace an existing folder when not resuming.
        callback: receives ``StartReport``, ``StepReport``, ``EvalReport`` and ``SaveReport``.

    Raises:
        ConfigError, DataError, OutputExistsError: before anything is written.
        TrainingError: the loss became NaN/inf (the last checkpoint is kept).
    """
    fastmath.keep_freed_memory()
    trainer = Trainer(
        model, train_set, valid_set, spec, config, adapter_path, base_model or {}, callback
    )
    trainer.setup(resume=resume, force=force)
    return trainer.run()
