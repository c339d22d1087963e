"""Matplotlib figures of a run's curves (object API only: no pyplot state, safe in server threads)."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from engine.run.stages import STAGES

from .metrics import MetricSeries, smooth

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INK, MUTED, GRID = "#1f2937", "#6b7280", "#e5e7eb"
RAW, SMOOTH, EVAL, LR = "#a5b4fc", "#4f46e5", "#f59e0b", "#0d9488"
PALETTE = ["#4f46e5", "#f59e0b", "#10b981", "#ef4444", "#0ea5e9", "#a855f7", "#84cc16", "#ec4899"]


CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Source Han Sans SC",
             "Microsoft YaHei", "PingFang SC", "SimHei")


@lru_cache(maxsize=1)
def _font_family() -> list[str]:
    """DejaVu Sans, then the first installed CJK font (matplotlib falls back glyph by glyph)."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [n for n in CJK_FONTS if n in names][:1]


def _figure(width: float = 6.4, height: float = 3.4):
    # matplotlib is imported on the first figure, not with the page: the server answers sooner
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    _style(ax)
    return fig, ax


def _labels(ax, title: str, xlabel: str, ylabel: str) -> None:
    family = _font_family()
    ax.set_title(title, loc="left", fontsize=10, color=INK, fontweight="bold", family=family)
    ax.set_xlabel(xlabel, fontsize=8, color=MUTED, family=family)
    ax.set_ylabel(ylabel, fontsize=8, color=MUTED, family=family)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color=MUTED, fontsize=9,
            family=_font_family())
    ax.set_xticks([])
    ax.set_yticks([])


def _style(ax) -> None:
    ax.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#d1d5db")
    ax.tick_params(colors=MUTED, labelsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def stage_panels(stage: str) -> list[list[str]]:
    """The metric panels drawn under the loss for a stage (its row of the stage table)."""
    row = STAGES.get(stage or "")
    return [list(panel) for panel in row.metrics] if row else []


def loss_figure(series: MetricSeries | None, words: dict[str, str], stage: str = "") -> Figure:
    """Training loss (raw and smoothed) and eval loss by step; under it, the stage's own metrics (rewards,
    margins, accuracy, KL, ...), one small panel each, once the run has logged them."""
    panels = [p for p in stage_panels(stage) if series and any(_metric(series, k)[0] for k in p)]
    fig, ax = _figure(6.4, 3.4 + (2.3 if panels else 0))
    if panels:
        grid = fig.add_gridspec(2, len(panels), height_ratios=[3.4, 2.3])
        ax.set_subplotspec(grid[0, :])
        for n, keys in enumerate(panels):
            _metric_panel(fig.add_subplot(grid[1, n]), series, keys, n)
    _labels(ax, words["loss"], words["step"], words["loss"])
    xs, ys = series.column("loss") if series else ([], [])
    if not xs:
        _empty(ax, words["waiting"])
        return fig
    marker = "o" if len(xs) <= 40 else None
    ax.plot(xs, ys, color=RAW, linewidth=1.0, marker=marker, markersize=2.5, label=words["raw"])
    if len(xs) >= 3:
        ax.plot(xs, smooth(ys), color=SMOOTH, linewidth=2.0, label=words["smoothed"])
    ex, ey = series.column("eval_loss", "eval")
    if ex:
        ax.plot(ex, ey, color=EVAL, linewidth=1.6, marker="o", markersize=4, label=words["eval"])
    ax.legend(fontsize=8, frameon=False, loc="upper right", prop={"family": _font_family(), "size": 8})
    if len(xs) == 1:
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    return fig


def _metric(series: MetricSeries, key: str) -> tuple[list[int], list[float]]:
    return series.column(key, "eval" if key.startswith("eval_") else "train")


def _metric_panel(ax, series: MetricSeries, keys: list[str], n: int) -> None:
    _style(ax)
    ax.tick_params(labelsize=7)
    for i, key in enumerate(keys):
        xs, ys = _metric(series, key)
        if not xs:
            continue
        color = PALETTE[(n * 2 + i) % len(PALETTE)]
        ax.plot(xs, ys, color=color, linewidth=1.4, marker="o" if len(xs) <= 20 else None, markersize=2.5,
                label=key, alpha=0.9 if key.startswith("eval_") else 1.0, linestyle="--" if key.startswith("eval_") else "-")
    ax.legend(fontsize=7, frameon=False, loc="best")


def lr_figure(series: MetricSeries | None, words: dict[str, str]) -> Figure:
    fig, ax = _figure(4.6, 3.4)
    _labels(ax, words["lr"], words["step"], "")
    xs, ys = series.column("learning_rate") if series else ([], [])
    if not xs:
        _empty(ax, words["waiting"])
        return fig
    ax.plot(xs, ys, color=LR, linewidth=1.8)
    ax.fill_between(xs, ys, color=LR, alpha=0.08)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.yaxis.get_offset_text().set_fontsize(7)
    return fig


def overlay_figure(runs: list[tuple[str, MetricSeries]], words: dict[str, str]) -> Figure:
    """Several runs' smoothed training losses (raw as a faint line behind) on one axis."""
    fig, ax = _figure(9.0, 3.6)
    _labels(ax, words["compare"], words["step"], words["loss"])
    drawn = 0
    for n, (name, series) in enumerate(runs):
        xs, ys = series.column("loss")
        if not xs:
            continue
        color = PALETTE[n % len(PALETTE)]
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(ys), color=color, linewidth=1.8, label=name)
        drawn += 1
    if not drawn:
        _empty(ax, words["pick"])
        return fig
    ax.legend(fontsize=7, frameon=False, loc="upper right")
    return fig


def has_cjk_font() -> bool:
    return len(_font_family()) > 1


def plot_words(lang: str) -> dict[str, str]:
    """The words drawn into a figure, in ``lang`` where a CJK font can draw them (else English)."""
    from .i18n import t

    lang = lang if has_cjk_font() else "en"
    return {k: t(lang, f"plot.{k}") for k in ("loss", "step", "raw", "smoothed", "eval", "lr", "waiting", "compare", "pick")}


def length_figure(prompt: list[int], response: list[int], cutoff: int, words: dict[str, str]) -> Figure:
    """Token lengths of a dataset's examples (total filled; prompt and response as outlines) with the cutoff."""
    fig, ax = _figure(6.4, 3.2)
    _labels(ax, words["title"], words["tokens"], words["examples"])
    total = [p + r for p, r in zip(prompt, response)]
    if not total:
        _empty(ax, words["empty"])
        return fig
    longest = max(total)
    top = max(longest, cutoff) if cutoff <= 1.5 * longest else longest  # a far-off cutoff would squash the bars
    bins = [top * i / 40 for i in range(41)]
    ax.hist(total, bins, color=SMOOTH, alpha=0.22, label=words["total"])
    if any(prompt):  # pretraining text has no prompt: its total is its response
        ax.hist(prompt, bins, histtype="step", color=EVAL, linewidth=1.4, label=words["prompt"])
        ax.hist(response, bins, histtype="step", color=LR, linewidth=1.4, label=words["response"])
    if cutoff <= top:
        ax.axvline(cutoff, color="#ef4444", linestyle="--", linewidth=1.4, label=words["cutoff"])
    else:
        ax.text(0.99, 0.02, f"{words['cutoff']} →", transform=ax.transAxes, ha="right", va="bottom", color="#ef4444",
                fontsize=8, family=_font_family())
    ax.legend(fontsize=8, frameon=False, loc="upper right", prop={"family": _font_family(), "size": 8})
    return fig


PLOTS_DIR = "plots"


def save_run_plots(series: MetricSeries, run_dir, words: dict[str, str], stage: str = "",
                   formats: tuple[str, ...] = ("png", "svg")) -> list:
    """The run's loss (with its stage's metrics) and learning-rate curves as files in ``run_dir/plots/``."""
    from pathlib import Path

    out = Path(run_dir) / PLOTS_DIR
    out.mkdir(exist_ok=True)
    written = []
    for name, fig in (("loss", loss_figure(series, words, stage)), ("learning_rate", lr_figure(series, words))):
        for fmt in formats:
            fig.savefig(out / f"{name}.{fmt}", format=fmt)
            written.append(out / f"{name}.{fmt}")
    return written


def save_overlay(runs: list[tuple[str, MetricSeries]], dest, words: dict[str, str],
                 formats: tuple[str, ...] = ("png", "svg")) -> list:
    """Several runs' losses on one axis, as ``dest/compare.<fmt>``."""
    from pathlib import Path

    fig = overlay_figure(runs, words)
    written = []
    for fmt in formats:
        path = Path(dest) / f"compare.{fmt}"
        fig.savefig(path, format=fmt)
        written.append(path)
    return written
