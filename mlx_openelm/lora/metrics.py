"""``metrics.jsonl``: one JSON object per line (train steps and validations), rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..folder import atomic_write_text
from ..jsonio import read_jsonl

# exp(710) overflows a float: a diverged run's perplexity is reported as exp(700) instead.
_MAX_LOG_PERPLEXITY = 700.0


def perplexity(loss: float) -> float:
    """The perplexity of a mean token loss (nats), capped so that a diverged run still logs."""
    return math.exp(min(loss, _MAX_LOG_PERPLEXITY))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics file (a torn last line from a crash is skipped)."""
    records = read_jsonl(path, DataError, "delete the metrics file", skip_bad=True)
    return [record for _, record in records]


class MetricsLog:
    """Appends records to ``path``; disabled on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        """Keep only records up to ``step`` (a resumed run re-logs what came after)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
