"""Runs tab: every job of the workspace (training runs, evaluations, exports, with their kind), loss curves of several runs overlaid, and one run opened
(config, curves, checkpoints with their step and loss), with Watch and Delete (confirmed)."""

from __future__ import annotations

import gradio as gr

from engine.run import rundir
from engine.run.config import RunConfig

from ..i18n import t
from ..runs import RunError
from ..views import esc, message, when
from . import curveview

REFRESH_S = 4.0
COLUMNS = ("run", "kind", "status", "stage", "method", "model", "data", "step", "loss", "started")


def headers(lang: str) -> list[str]:
    return [t(lang, f"runs.col.{k}") for k in COLUMNS]


def table(ctx, lang: str) -> list[list]:
    rows = []
    for r in ctx.manager.runs(None):  # every job: training runs, evaluations, exports
        state = t(lang, f"state.{r.state}") + (f" #{r.queue_position}" if r.queue_position else "")
        rows.append([r.id, r.kind, state, r.stage, r.method, r.model, ", ".join(r.datasets),
                     f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step),
                     f"{r.last_loss:.4f}" if r.last_loss is not None else "", when(r.started_at or r.created_at)])
    return rows


def checkpoint_rows(ctx, run_dir) -> list[list]:
    series = ctx.manager.series(run_dir)
    out = []
    for step, path in rundir.checkpoints(run_dir):
        loss = series.loss_at(step)
        out.append([path.name, step, f"{loss:.4f}" if loss is not None else "", str(path)])
    return out


def run_figure(m, run_dir, lang: str, smoothing: float = curveview.curves.DEFAULT_SMOOTHING, x: str = "step"):
    """The run's loss curve (raw, smoothed, eval)."""
    return curveview.loss_update(m.series(run_dir), lang, smoothing, x)


def tensorboard_command(m, ids: list[str], lang: str) -> str:
    """The `tensorboard --logdir_spec` line for the chosen runs that logged to TensorBoard (training.report_to)."""
    logged = []
    for run_id in ids:
        try:
            path = m.run_dir(run_id) / rundir.TENSORBOARD
        except RunError:
            continue
        if path.is_dir():
            logged.append(f"{run_id}:{path}")
    if not logged:
        return ""
    import shlex

    command = f"tensorboard --logdir_spec {shlex.quote(','.join(logged))}"
    return f'<div class="wb-hint">{esc(t(lang, "plot.tensorboard"))} <code id="tb-command">{esc(command)}</code></div>'


def build(ctx) -> None:
    c = ctx.shared
    lang = ctx.lang
    with gr.Tab(ctx.t("tabs.runs"), id="runs") as tab:
        ctx.translate(tab, label="tabs.runs")
        with gr.Row(equal_height=True):
            c["runs_refresh"] = ctx.translate(gr.Button(ctx.t("runs.refresh"), size="sm", scale=0, min_width=120,
                                                        elem_id="btn-runs-refresh"), value="runs.refresh")
            c["runs_hint"] = ctx.translate(gr.Markdown(ctx.t("runs.hint")), value="runs.hint")
        c["runs_table"] = gr.Dataframe(value=[], headers=headers(lang), interactive=False, wrap=True,
                                       elem_id="runs-table", max_height=360, show_search="search")
        with gr.Row():
            c["compare"] = ctx.translate(gr.Dropdown([], value=[], multiselect=True, label=ctx.t("runs.compare"),
                                                     elem_id="compare-runs"), label="runs.compare")
            c["runs_smoothing"], c["runs_x_axis"] = curveview.controls(ctx, "runs")
        c["overlay"] = curveview.line_plot("overlay-plot", visible=False)
        c["tb_command"] = gr.HTML("", elem_id="tb-command-box")
        with gr.Row(equal_height=False, elem_classes="wb-toolbar"):
            c["open"] = ctx.translate(gr.Dropdown([], value=None, label=ctx.t("runs.open"), elem_id="open-run", scale=4),
                                      label="runs.open")
            c["watch"] = ctx.translate(gr.Button(ctx.t("runs.watch"), scale=1, elem_id="btn-watch"), value="runs.watch")
            c["delete"] = ctx.translate(gr.Button(ctx.t("runs.delete"), variant="stop", scale=1, elem_id="btn-delete"),
                                        value="runs.delete")
        with gr.Row(visible=False, elem_id="confirm-row") as confirm:
            c["confirm_text"] = gr.HTML("")
            c["confirm_yes"] = ctx.translate(gr.Button(ctx.t("runs.confirm_delete"), variant="stop", elem_id="btn-confirm-delete"),
                                             value="runs.confirm_delete")
            c["confirm_no"] = ctx.translate(gr.Button(ctx.t("runs.cancel"), elem_id="btn-cancel-delete"), value="runs.cancel")
        c["confirm"] = confirm
        c["runs_msg"] = gr.HTML("", elem_id="runs-msg")
        with gr.Column(visible=False) as details:
            with gr.Row(equal_height=True):
                c["run_config"] = gr.Code("", language="yaml", label="config.yaml", lines=18, max_lines=18,
                                          interactive=False, elem_id="run-config")
                c["run_plot"] = curveview.line_plot("run-plot")
            c["ckpt_table"] = ctx.translate(
                gr.Dataframe(value=[], headers=[t(lang, f"runs.ckpt.{k}") for k in ("name", "step", "loss", "path")],
                             interactive=False, label=ctx.t("runs.checkpoints"), elem_id="ckpt-table"),
                label="runs.checkpoints", headers=lambda lg: [t(lg, f"runs.ckpt.{k}") for k in ("name", "step", "loss", "path")])
        c["run_details"] = details
        c["runs_tab"] = tab
        c["runs_timer"] = gr.Timer(REFRESH_S)
        c["runs_sig"] = gr.State(None)
        c["runs_shown"] = gr.State({})  # plot -> the series its chart holds (curveview.staged)


def wire(ctx) -> None:
    c, m, lang = ctx.shared, ctx.manager, ctx.shared["lang"]

    def compare(lg, ids, shown: dict, smoothing, x):
        """The overlay of the runs ``ids``, the TensorBoard line, and False where the chart was only emptied."""
        runs = []
        for run_id in ids or []:
            try:
                runs.append((run_id, m.series(m.run_dir(run_id))))
            except RunError:
                continue
        plot, whole = curveview.staged(curveview.overlay_update(runs, lg, smoothing, x), shown, "overlay")
        plot["visible"] = bool(runs)
        return plot, tensorboard_command(m, [name for name, _ in runs], lg), whole

    def on_compare(lg, ids, shown, smoothing=curveview.curves.DEFAULT_SMOOTHING, x="step"):
        shown = dict(shown or {})
        return *compare(lg, ids, shown, smoothing, x)[:2], shown

    def compare_again(lg, ids, shown, smoothing=curveview.curves.DEFAULT_SMOOTHING, x="step"):
        """The overlay, after a change that may only have emptied it; nothing to do when its chart holds series."""
        if (shown or {}).get("overlay"):
            return gr.skip(), gr.skip(), shown
        return on_compare(lg, ids, shown, smoothing, x)

    def open_plot(lg, run_id, shown, smoothing=curveview.curves.DEFAULT_SMOOTHING, x="step"):
        """The open run's curve, after an event that may only have emptied it (nothing to do when it holds series)."""
        shown = dict(shown or {})
        if not run_id or shown.get("run"):
            return gr.skip(), shown
        try:
            plot, _ = curveview.staged(run_figure(m, m.run_dir(run_id), lg, smoothing, x), shown, "run")
        except RunError:
            return gr.skip(), shown
        return plot, shown

    def refresh(lg, sig, open_id, compared, shown, smoothing=curveview.curves.DEFAULT_SMOOTHING, x="step"):
        """The table, and the open run's curve and checkpoints and the overlay, when anything changed."""
        rows = table(ctx, lg)
        new_sig = (lg, repr(rows))
        if new_sig == sig:
            return (gr.skip(),) * 3 + (sig,) + (gr.skip(),) * 4 + (shown,)
        shown = dict(shown or {})
        ids = [r[0] for r in rows]
        keep_open = open_id if open_id in ids else None
        keep_compare = [r for r in (compared or []) if r in ids]
        plot = ckpts = gr.skip()
        whole = True
        if keep_open:
            try:
                run_dir = m.run_dir(keep_open)
                plot, whole = curveview.staged(run_figure(m, run_dir, lg, smoothing, x), shown, "run")
                ckpts = checkpoint_rows(ctx, run_dir)
            except RunError:  # deleted between the listing and now
                keep_open = None
        overlay, tb = gr.skip(), gr.skip()
        if keep_compare:
            overlay, tb, whole_overlay = compare(lg, keep_compare, shown, smoothing, x)
            whole = whole and whole_overlay
        # a chart only emptied (curveview.staged) is drawn by the next refresh
        return (gr.update(value=rows, headers=headers(lg)), gr.update(choices=ids, value=keep_open),
                gr.update(choices=ids, value=keep_compare), new_sig if whole else None, overlay, tb, plot, ckpts, shown)

    view = [c["runs_smoothing"], c["runs_x_axis"]]
    refresh_io = ([lang, c["runs_sig"], c["open"], c["compare"], c["runs_shown"], *view],
                  [c["runs_table"], c["open"], c["compare"], c["runs_sig"], c["overlay"], c["tb_command"], c["run_plot"],
                   c["ckpt_table"], c["runs_shown"]])
    forced = refresh_io[0][:1] + refresh_io[0][2:]

    def refresh_now(lg, o, cm, shown, smoothing, x):
        return refresh(lg, None, o, cm, shown, smoothing, x)

    c["runs_timer"].tick(refresh, *refresh_io, show_progress="hidden", queue=False)
    for event in (c["runs_refresh"].click, c["runs_tab"].select, *(w.input for w in view)):
        event(refresh_now, forced, refresh_io[1], show_progress="hidden").then(
            refresh, *refresh_io, show_progress="hidden")  # a chart emptied first is drawn now
    ctx.on_load.append((refresh_now, forced, refresh_io[1]))

    compare_io = ([lang, c["compare"], c["runs_shown"], *view], [c["overlay"], c["tb_command"], c["runs_shown"]])
    c["compare"].change(on_compare, *compare_io, show_progress="hidden").then(compare_again, *compare_io,
                                                                              show_progress="hidden")

    def on_open(lg, run_id, shown, smoothing=curveview.curves.DEFAULT_SMOOTHING, x="step"):
        hidden = gr.update(visible=False)
        shown = dict(shown or {})
        if not run_id:
            shown["run"] = []
            return "", None, [], "", hidden, hidden, shown
        try:
            run_dir = m.run_dir(run_id)
        except RunError as err:
            shown["run"] = []
            return "", None, [], message("error", str(err)), hidden, hidden, shown
        text = (run_dir / rundir.CONFIG).read_text(encoding="utf-8")
        plot, _ = curveview.staged(run_figure(m, run_dir, lg, smoothing, x), shown, "run")
        return text, plot, checkpoint_rows(ctx, run_dir), "", hidden, gr.update(visible=True), shown

    open_out = [c["run_config"], c["run_plot"], c["ckpt_table"], c["runs_msg"], c["confirm"], c["run_details"],
                c["runs_shown"]]
    redraw = ([lang, c["open"], c["runs_shown"], *view], [c["run_plot"], c["runs_shown"]])
    c["open"].input(on_open, [lang, c["open"], c["runs_shown"], *view], open_out, show_progress="hidden").then(
        open_plot, *redraw, show_progress="hidden")  # a chart emptied first is drawn now

    def on_select(lg, rows, shown, smoothing, x, evt: gr.SelectData):
        """A click on a row opens that run."""
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            run_id = rows.iloc[row, 0] if hasattr(rows, "iloc") else rows[row][0]
        except (IndexError, KeyError, TypeError):
            return (gr.skip(),) * (len(open_out) + 1)
        return (run_id, *on_open(lg, run_id, shown, smoothing, x))

    c["runs_table"].select(on_select, [lang, c["runs_table"], c["runs_shown"], *view], [c["open"], *open_out],
                           show_progress="hidden").then(open_plot, *redraw, show_progress="hidden")

    def on_watch(lg, run_id):
        if not run_id:
            return gr.skip(), gr.skip(), message("warn", t(lg, "runs.pick_first"))
        choices = [r.path.name for r in m.runs()]
        return gr.update(choices=choices, value=run_id), gr.Tabs(selected="train"), ""

    c["watch"].click(on_watch, [lang, c["open"]], [c["run"], c["tabs"], c["runs_msg"]]).then(
        lambda: {}, None, c["view"])

    def on_delete(lg, run_id):
        if not run_id:
            return gr.update(visible=False), "", message("warn", t(lg, "runs.pick_first"))
        return gr.update(visible=True), message("warn", t(lg, "runs.confirm_text", run=run_id)), ""

    c["delete"].click(on_delete, [lang, c["open"]], [c["confirm"], c["confirm_text"], c["runs_msg"]])
    c["confirm_no"].click(lambda: gr.update(visible=False), None, c["confirm"])

    def on_confirm(lg, run_id):
        hidden = gr.update(visible=False)
        try:
            m.delete(run_id)
        except (RunError, OSError) as err:
            return hidden, message("error", t(lg, "runs.delete_failed"), [str(err)]), gr.skip(), None, gr.skip()
        return hidden, message("ok", t(lg, "runs.deleted", run=run_id)), None, None, hidden

    c["confirm_yes"].click(on_confirm, [lang, c["open"]],
                           [c["confirm"], c["runs_msg"], c["open"], c["runs_sig"], c["run_details"]])
