"""A run's metrics as plot-ready series, read incrementally from ``metrics.jsonl``.

``MetricSeries.update()`` reads only the lines appended since the last call (a byte offset
kept by :class:`engine.run.rundir.JsonlTail`; a half-written last line waits for the next call).
A resumed run appends to the same file and logs some steps again: the later row wins, and
a training row for step ``s`` at or before the last step seen drops every older row from
``s`` on (the resumed timeline replaces the abandoned one). Imports no gradio.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from engine.run import rundir


class MetricSeries:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.tail = rundir.JsonlTail(self.run_dir / rundir.METRICS)
        self.train: dict[int, dict[str, Any]] = {}  # step -> row with "loss"
        self.eval: dict[int, dict[str, Any]] = {}  # step -> row with "eval_loss"
        self.latest: dict[str, Any] = {}  # the newest row of any kind (progress, tokens/s, memory)
        self.version = 0  # bumps whenever new rows arrive, so a page can skip redrawing

    def update(self) -> int:
        """Read new rows; returns how many arrived."""
        rows = self.tail.read_new()
        for row in rows:
            self.add(row)
        if rows:
            self.version += 1
        return len(rows)

    def add(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        if not isinstance(step, int):
            return
        if _finite(row.get("loss")):
            if self.train and step <= max(self.train):
                self.train = {s: r for s, r in self.train.items() if s < step}
                self.eval = {s: r for s, r in self.eval.items() if s < step}
            self.train[step] = row
        if _finite(row.get("eval_loss")):
            self.eval[step] = row
        self.latest = {**self.latest, **row} if row.get("step") == self.latest.get("step") else dict(row)

    # ------------------------------------------------------------ plot-ready views

    @property
    def points(self) -> int:
        return len(self.train)

    def steps(self) -> list[int]:
        return sorted(self.train)

    def column(self, key: str, source: str = "train") -> tuple[list[int], list[float]]:
        table = self.train if source == "train" else self.eval
        xs, ys = [], []
        for step in sorted(table):
            value = table[step].get(key)
            if _finite(value):
                xs.append(step)
                ys.append(float(value))
        return xs, ys

    def loss_at(self, step: int) -> float | None:
        """The training loss logged at ``step``, or the closest one before it."""
        before = [s for s in self.train if s <= step]
        return float(self.train[max(before)]["loss"]) if before else None

    def last_loss(self) -> float | None:
        return float(self.train[max(self.train)]["loss"]) if self.train else None


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); the weight grows with the point count."""
    if not values:
        return []
    if weight is None:
        weight = min(0.9, 0.6 + 0.3 * (1 - math.exp(-len(values) / 200)))
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last = last * weight + (1 - weight) * v
        norm = norm * weight + (1 - weight)
        out.append(last / norm)
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
