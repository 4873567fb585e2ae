"""This machine's memory read bandwidth, measured outside MLX: the honest decode limit.

Decoding one token streams every weight once, so ``read bandwidth / bytes per token`` bounds the
generation speed of *any* runtime. Measuring that bandwidth through MLX itself would bound us by
our own engine (MLX's CPU reductions reach ~6 GB/s on the reference VM, while the memory system
delivers several times more), and the limit would then call an MLX-bound decode "100%".

So the read rate is measured with plain NumPy, one reader *process* per core (no GIL, no shared
thread pool): each sums its own float32 array (a streaming, vectorised read), all start together
at a barrier, and the rate is all the bytes read over the slowest reader's time, best of
``repeats``. Arrays are 4x larger than any cache level here, so the data come from DRAM.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Bandwidth:
    """A measured read bandwidth and how it was measured (for labels)."""

    gbs: float
    readers: int
    megabytes_each: int
    repeats: int

    @property
    def method(self) -> str:
        who = "one per core" if self.readers == (os.cpu_count() or 1) else "alone"
        return (
            f"NumPy float32 sum outside MLX, {self.readers} reader process(es) ({who}) x "
            f"{self.megabytes_each} MB, best of {self.repeats}"
        )


def _reader(nbytes: int, repeats: int, barrier, results) -> None:  # noqa: ANN001 - mp objects
    import numpy as np

    data = np.ones(nbytes // 4, dtype=np.float32)  # written once: every page is resident
    data.sum()
    times = []
    for _ in range(repeats):
        barrier.wait()
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    results.put(times)


def measure_read_bandwidth(
    megabytes_each: int = 256, repeats: int = 5, readers: int | None = None
) -> Bandwidth:
    """Read bandwidth of this machine in GB/s, one NumPy reader process per core.

    Args:
        megabytes_each: the array each reader streams.
        repeats: timed passes; the best is kept.
        readers: reader processes (default: one per core).
    """
    readers = readers or os.cpu_count() or 1
    ctx = mp.get_context("spawn")  # a clean interpreter: no MLX threads carried into a fork
    barrier, results = ctx.Barrier(readers), ctx.Queue()
    nbytes = megabytes_each * (1 << 20)
    procs = [
        ctx.Process(target=_reader, args=(nbytes, repeats, barrier, results), daemon=True)
        for _ in range(readers)
    ]
    for p in procs:
        p.start()
    per_reader = [results.get() for _ in procs]
    for p in procs:
        p.join()
    # Pass r: every reader started at the same barrier, so the pass took the slowest one's time.
    wall = min(max(times[r] for times in per_reader) for r in range(repeats))
    return Bandwidth(readers * nbytes / wall / 1e9, readers, megabytes_each, repeats)
