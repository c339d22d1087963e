"""The interactive curves of the Train and Runs tabs (gr.LinePlot): hover for step, value and time; drag to zoom
(double-click resets); click a legend entry to hide or show its series; a smoothing slider; x by step, tokens or
time. The tables come from webui/curves.py; PNG/SVG files from webui/plots.py ("Save plots", `workbench plot`)."""

from __future__ import annotations

import gradio as gr

from .. import curves
from ..i18n import t
from ..plots import stage_panels

TOOLTIP = ["series", "step", "y", "time"]


def words(lang: str) -> dict[str, str]:
    keys = ("loss", "step", "raw", "smoothed", "eval", "lr", "waiting", "compare", "pick", "tokens", "elapsed_s")
    return {k: t(lang, f"plot.{k}") for k in keys}


def line_plot(elem_id: str, **kwargs) -> gr.LinePlot:
    plot = gr.LinePlot(None, x="step", y="y", color="series", tooltip=TOOLTIP,
                       show_label=False, elem_id=elem_id, height=kwargs.pop("height", 300), **kwargs)
    # drag across the plot to zoom into those x values; a double click shows everything again
    plot.select(_zoom, None, plot, show_progress="hidden", queue=False)
    plot.double_click(lambda: gr.update(x_lim=None), None, plot, show_progress="hidden", queue=False)
    return plot


def _zoom(evt: gr.SelectData):
    return gr.update(x_lim=list(evt.index))


def controls(ctx, prefix: str) -> tuple[gr.Slider, gr.Radio]:
    """The smoothing slider and the x-axis choice of one tab."""
    smoothing = ctx.translate(gr.Slider(0.0, 0.99, value=curves.DEFAULT_SMOOTHING, step=0.01, label=ctx.t("plot.smoothing"),
                                        elem_id=f"{prefix}-smoothing", scale=2), label="plot.smoothing")
    axis = ctx.translate(gr.Radio(_axes(ctx.lang), value="step", label=ctx.t("plot.x_axis"), elem_id=f"{prefix}-x-axis",
                                  scale=2), label="plot.x_axis", choices=_axes)
    return smoothing, axis


def series_toggle(ctx, prefix: str) -> gr.CheckboxGroup:
    """The loss plot's series, each switched on or off."""
    return ctx.translate(gr.CheckboxGroup(_series(ctx.lang), value=list(curves.LOSS_SERIES), label=ctx.t("plot.series"),
                                          elem_id=f"{prefix}-series", scale=2), label="plot.series", choices=_series)


def _series(lang: str) -> list[tuple[str, str]]:
    return [(t(lang, f"plot.{k}"), k) for k in curves.LOSS_SERIES]


def _axes(lang: str) -> list[tuple[str, str]]:
    return [(t(lang, f"plot.{x}"), x) for x in curves.X_AXES]


def metric_choices(stage: str, lang: str) -> list[tuple[str, str]]:
    """The second plot of a run: the learning rate, or one of its stage's metric panels."""
    return [(t(lang, "plot.lr"), "learning_rate")] + [(", ".join(p), ",".join(p)) for p in stage_panels(stage)]


def _update(rows: list[dict], colors: dict[str, str], x: str, title: str, lang: str, y_title: str = "",
            legend: str = "plot.series") -> dict:
    """A plot's new table. The page rebuilds a chart (axes, colour domain, legend) only when one of its settings
    changes, and swaps the rows in otherwise; the colour map holds exactly the series drawn. A change of series
    goes through :func:`staged`, since the rebuild reads the rows the chart had."""
    w = words(lang)
    shown = {r["series"] for r in rows}
    # no rows: no table at all (an empty one leaves the chart without a colour domain once rows arrive)
    return gr.update(value=curves.frame(rows, x) if rows else None, x=x, color_map={k: v for k, v in colors.items() if k in shown},
                     title=title, x_title=w[x], y_title=y_title, color_title=t(lang, legend))


def staged(update: dict, shown: dict, plot: str) -> tuple[dict, bool]:
    """Send a plot's new table in two steps when its series change. Gradio's chart (6.31) rebuilds itself when a
    setting such as the colour map or a title changes before the new rows reach it, and takes its colour domain from
    the rows it had: a series new to the chart (an eval that appears, a series switched back on, another language's
    names, one more run to compare) is drawn without colour, for good. A chart emptied first builds itself from the
    rows it then gets, so when the series differ from those ``shown[plot]`` records, this returns an emptied plot
    instead, and False: the caller sends the update again (the next tick, or an event's ``.then``). ``shown`` is
    updated with what the chart holds after the returned update."""
    rows = update.get("value")
    series = sorted(set(rows["series"])) if rows is not None else []
    if shown.get(plot) and series and series != shown[plot]:
        shown[plot] = []
        return gr.update(value=None), False
    shown[plot] = series
    return update, True


def loss_update(series, lang: str, smoothing: float, x: str, show=curves.LOSS_SERIES) -> dict:
    w = words(lang)
    rows = curves.loss_rows(series, w, smoothing, show)
    return _update(rows, curves.loss_colors(w), x, w["loss"] if rows else w["waiting"], lang, w["loss"])


def metric_update(series, lang: str, metric: str, x: str) -> dict:
    keys = [k for k in (metric or "learning_rate").split(",") if k]
    names = {"learning_rate": words(lang)["lr"]}  # the legend says it in the page's language; stage metrics keep TRL's names
    rows = curves.metric_rows(series, keys, names=names)
    title = words(lang)["lr"] if keys == ["learning_rate"] else ", ".join(keys)
    # the y axis says what it shows (an empty y_title makes the chart print the column's name, "y")
    return _update(rows, curves.metric_colors(keys, names), x, title if rows else words(lang)["waiting"], lang, title)


def overlay_update(runs, lang: str, smoothing: float, x: str) -> dict:
    rows = curves.overlay_rows(runs, smoothing)
    w = words(lang)
    return _update(rows, curves.run_colors([name for name, _ in runs]), x, w["compare"] if rows else w["pick"], lang,
                   w["loss"], legend="runs.col.run")
