"""A run's curves as tables for Gradio's interactive plots (gr.LinePlot): one row per point, with the columns a
hover shows (series, step, value, time) and the x axes a person can pick (step, tokens, elapsed time).

Colours are fixed per series name, so a run keeps its colour when the plot refreshes or other runs join it.
Imports no gradio; matplotlib stays in webui/plots.py for the PNG/SVG files.
"""

from __future__ import annotations

import time
import zlib

import pandas as pd

from .metrics import MetricSeries, smooth
from .plots import EVAL, LR, PALETTE, RAW, SMOOTH

X_AXES = ("step", "tokens", "elapsed_s")
COLUMNS = ["series", "step", "tokens", "elapsed_s", "y", "time"]
DEFAULT_SMOOTHING = 0.6


def _clock(t) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else ""


def _rows(series: MetricSeries, key: str, name: str, source: str = "train", smoothing: float | None = None) -> list[dict]:
    table = series.train if source == "train" else series.eval
    steps = [s for s in sorted(table) if isinstance(table[s].get(key), (int, float))]
    values = [float(table[s][key]) for s in steps]
    if smoothing is not None:
        values = smooth(values, smoothing) if smoothing > 0 else values
    out = []
    for step, value in zip(steps, values):
        row = table[step]
        near = series.train.get(step, row)  # eval rows carry no progress fields: take the training row's
        out.append({"series": name, "step": step, "tokens": near.get("tokens", row.get("tokens")),
                    "elapsed_s": near.get("elapsed_s", row.get("elapsed_s")), "y": value,
                    "time": _clock(row.get("time"))})
    return out


NUMBERS = {"step": "int64", "tokens": "float64", "elapsed_s": "float64", "y": "float64"}


def frame(rows: list[dict], x: str) -> pd.DataFrame:
    """The plot's table; points without the chosen x (a trainer that counts no tokens) are left out. The column
    types are fixed, even with no rows: the page builds the chart's axes from the first table it gets and then
    only swaps the rows in, so an empty first table must already say which columns are numbers."""
    df = pd.DataFrame(rows, columns=COLUMNS).astype(NUMBERS)
    return df[df[x].notna()].reset_index(drop=True) if x != "step" else df


LOSS_SERIES = ("raw", "smoothed", "eval")


def loss_rows(series: MetricSeries | None, words: dict[str, str], smoothing: float = DEFAULT_SMOOTHING,
              show: tuple[str, ...] | list[str] = LOSS_SERIES) -> list[dict]:
    """Training loss (raw and smoothed by ``smoothing``, TensorBoard's debiased EMA) and eval loss; ``show`` names
    the series switched on."""
    if series is None:
        return []
    rows = _rows(series, "loss", words["raw"]) if "raw" in show else []
    if smoothing > 0 and "smoothed" in show:
        rows += _rows(series, "loss", words["smoothed"], smoothing=smoothing)
    return rows + (_rows(series, "eval_loss", words["eval"], "eval") if "eval" in show else [])


def loss_colors(words: dict[str, str]) -> dict[str, str]:
    return {words["raw"]: RAW, words["smoothed"]: SMOOTH, words["eval"]: EVAL}


def metric_rows(series: MetricSeries | None, keys: list[str], smoothing: float = 0.0,
                names: dict[str, str] | None = None) -> list[dict]:
    """The learning rate or a stage's own metrics (rewards, margins, accuracy, KL, ...), one series per key, named
    ``names[key]`` (the key itself by default)."""
    if series is None:
        return []
    rows = []
    for key in keys:
        source = "eval" if key.startswith("eval_") else "train"
        rows += _rows(series, key, (names or {}).get(key, key), source, smoothing=smoothing if source == "train" else None)
    return rows


def metric_colors(keys: list[str], names: dict[str, str] | None = None) -> dict[str, str]:
    return {(names or {}).get(k, k): (LR if k == "learning_rate" else PALETTE[i % len(PALETTE)]) for i, k in enumerate(keys)}


def run_colors(names: list[str]) -> dict[str, str]:
    """A colour per run from its name (crc32), moved to the next free one on a clash: the same runs always get the
    same colours, whatever order they were picked in."""
    out, used = {}, set()
    for name in sorted(names):
        i = zlib.crc32(name.encode()) % len(PALETTE)
        for _ in range(len(PALETTE)):
            if PALETTE[i] not in used:
                break
            i = (i + 1) % len(PALETTE)
        out[name] = PALETTE[i]
        used.add(PALETTE[i])
    return out


def overlay_rows(runs: list[tuple[str, MetricSeries]], smoothing: float = DEFAULT_SMOOTHING) -> list[dict]:
    """Several runs' training losses (smoothed by ``smoothing``), one series per run."""
    rows = []
    for name, series in runs:
        rows += _rows(series, "loss", name, smoothing=smoothing)
    return rows
