"""Train tab: preview, Start, Stop, Resume, and the live view of one run (card, curves, log)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import gradio as gr

from engine.run import jobs, launch, rundir
from engine.run.checks import check, warnings
from engine.run.config import ConfigError, RunConfig, dump_config

from ..i18n import t
from ..modelinfo import ModelPathError, resolve_model_path
from ..plots import plot_words, save_run_plots
from ..runs import RunError
from ..views import log_html, message, run_card
from . import curveview

TICK_S = 1.5


def with_project_paths(cfg: RunConfig) -> RunConfig:
    """A relative model path that exists from the project root (not from here) is made absolute."""
    try:
        path = resolve_model_path(cfg.model.path)
    except ModelPathError:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.model.path = str(path)
    return cfg


def problem_lines(err: ConfigError) -> list[str]:
    return [f"{field.removeprefix('form: ')}: {msg}" if field else msg for field, msg in err.problems]


def warning_html(lang: str, cfg: RunConfig) -> str:
    """The config's warnings (settings that run, slowly or oddly, on this machine) as a message box, or ''."""
    lines = [f"{f}: {m}" for f, m in warnings(cfg)]
    return message("warn", t(lang, "train.start_warnings"), lines) if lines else ""


def preview(ctx, cfg: RunConfig) -> tuple[str, str, list[str]]:
    """(config.yaml text, command line, problems) of the run Start would create now."""
    cfg = launch.resolve_paths(with_project_paths(cfg))
    run_dir = Path(cfg.output.run_dir) if cfg.output.run_dir else jobs.new_job_dir(cfg, ctx.workspace)
    cfg.output.run_dir = str(run_dir)
    problems = [f"{f}: {m}" for f, m in check(cfg, run_dir)]
    cmd = shlex.join(launch.build_command(cfg, run_dir))
    if cfg.distributed.master_port is None:
        cmd = re.sub(r"--master_port \d+", "--master_port AUTO", cmd)
    return dump_config(cfg), cmd, problems


def pick_run(ctx) -> str | None:
    """The run a freshly opened page watches: the newest active one, else the newest queued, else the newest."""
    runs = ctx.manager.runs()
    for states in (("starting", "running", "stopping"), ("queued",)):
        for r in runs:
            if r.state in states:
                return r.id
    return runs[0].id if runs else None


def build(ctx) -> None:
    c = ctx.shared
    with gr.Tab(ctx.t("tabs.train"), id="train") as tab:
        ctx.translate(tab, label="tabs.train")
        with gr.Row(equal_height=True, elem_classes="wb-toolbar"):
            c["start"] = ctx.translate(gr.Button(ctx.t("train.start"), variant="primary", elem_id="btn-start", scale=2), value="train.start")
            c["stop"] = ctx.translate(gr.Button(ctx.t("train.stop"), variant="stop", elem_id="btn-stop", interactive=False, scale=1), value="train.stop")
            c["force"] = ctx.translate(gr.Button(ctx.t("train.force_stop"), variant="secondary", elem_id="btn-force", visible=False, scale=1), value="train.force_stop")
            c["ckpt"] = ctx.translate(gr.Dropdown([], value=None, label=ctx.t("train.resume_from"), elem_id="resume-ckpt", scale=2, interactive=True), label="train.resume_from")
            c["resume"] = ctx.translate(gr.Button(ctx.t("train.resume"), elem_id="btn-resume", interactive=False, scale=1), value="train.resume")
            c["run"] = ctx.translate(gr.Dropdown([], value=None, label=ctx.t("train.watching"), elem_id="watch-run", scale=3), label="train.watching")
        c["train_msg"] = gr.HTML("", elem_id="train-msg")
        c["card"] = gr.HTML(run_card(ctx.lang, None, None), elem_id="run-card-box")
        with gr.Row(equal_height=True, elem_classes="wb-toolbar"):
            c["smoothing"], c["x_axis"] = curveview.controls(ctx, "train")
            c["series"] = curveview.series_toggle(ctx, "train")
            c["metric"] = ctx.translate(gr.Dropdown(curveview.metric_choices("", ctx.lang), value="learning_rate",
                                                    label=ctx.t("plot.metric"), elem_id="train-metric", scale=2),
                                        label="plot.metric")
            c["save_plots"] = ctx.translate(gr.Button(ctx.t("plot.save"), size="sm", elem_id="btn-save-plots", scale=1),
                                            value="plot.save")
        c["plots_msg"] = gr.HTML("", elem_id="plots-msg")
        with gr.Row(equal_height=True):
            c["loss_plot"] = curveview.line_plot("loss-plot", scale=3)
            c["lr_plot"] = curveview.line_plot("lr-plot", scale=2)
        with gr.Accordion(ctx.t("train.log"), open=True) as acc:
            ctx.translate(acc, label="train.log")
            c["log"] = gr.HTML(log_html(""), elem_id="train-log-box")
        with gr.Accordion(ctx.t("train.preview"), open=False, elem_id="preview-acc") as acc:
            ctx.translate(acc, label="train.preview")
            c["preview_btn"] = ctx.translate(gr.Button(ctx.t("train.preview_btn"), size="sm", elem_id="btn-preview"), value="train.preview_btn")
            c["preview_msg"] = gr.HTML("")
            with gr.Row():
                c["preview_yaml"] = gr.Code("", language="yaml", label="config.yaml", lines=16, max_lines=30, interactive=False, elem_id="preview-yaml")
                c["preview_cmd"] = gr.Code("", language="shell", label="command", lines=4, interactive=False, elem_id="preview-cmd", wrap_lines=True)
        c["train_tab"] = tab
        c["timer"] = gr.Timer(TICK_S)
        c["view"] = gr.State({})
        c["shown"] = gr.State({})  # plot -> the series its chart holds (curveview.staged); kept when the view resets


def wire(ctx) -> None:
    c, m = ctx.shared, ctx.manager
    lang = c["lang"]
    fields = set(ctx.fields.values())
    outputs = [c["card"], c["loss_plot"], c["lr_plot"], c["log"], c["ckpt"], c["stop"], c["force"], c["resume"], c["view"],
               c["metric"], c["shown"]]

    def run_choices():
        return [r.path.name for r in m.runs()]

    def tick(run_id, lang_, view, smoothing=curveview.curves.DEFAULT_SMOOTHING, x="step", metric="learning_rate",
             show=curveview.curves.LOSS_SERIES, shown=None):
        show = tuple(show or ())
        view, shown = dict(view or {}), dict(shown or {})
        out = {k: gr.skip() for k in outputs}
        out[c["shown"]] = shown

        def plots(series) -> bool:
            """Both plots' updates; False where one was only emptied (curveview.staged) and needs the next tick."""
            loss, whole = curveview.staged(curveview.loss_update(series, lang_, smoothing, x, show), shown, "loss")
            lr, whole_lr = curveview.staged(curveview.metric_update(series, lang_, metric, x), shown, "lr")
            out.update({c["loss_plot"]: loss, c["lr_plot"]: lr})
            return whole and whole_lr

        if not run_id:
            card = run_card(lang_, None, None)
            if view.get("card") != card:
                plots(None)
                out.update({c["card"]: card, c["log"]: log_html(""),
                            c["stop"]: gr.update(interactive=False), c["resume"]: gr.update(interactive=False),
                            c["ckpt"]: gr.update(choices=[], value=None)})
                view = {"card": card}
            out[c["view"]] = view
            return out
        try:
            run_dir = m.run_dir(run_id)
        except RunError as err:
            out[c["card"]] = message("error", str(err))
            out[c["view"]] = {}
            return out
        series = m.series(run_dir)
        info = m.info(run_dir, series=series)
        card = run_card(lang_, info, series)
        if view.get("card") != card:
            out[c["card"]] = card
        if view.get("stage") != (info.stage, lang_):
            choices = curveview.metric_choices(info.stage, lang_)
            if metric not in [v for _, v in choices]:
                metric = "learning_rate"
            out[c["metric"]] = gr.update(choices=choices, value=metric)
        sig = (run_id, series.version, lang_, smoothing, x, metric, show)
        if view.get("plots") != sig and not plots(series):
            sig = None  # drawn at the next tick, into the emptied charts
        log = run_dir / rundir.LOG
        log_sig = (run_id, log.stat().st_size if log.exists() else 0)
        if view.get("log") != log_sig:
            out[c["log"]] = log_html(rundir.log_tail(run_dir, lines=200))
        ckpts = [p.name for _, p in rundir.checkpoints(run_dir)]
        active = info.state in rundir.ACTIVE
        controls = (run_id, tuple(ckpts), info.state)
        if view.get("controls") != controls:
            choices = (["latest"] + ckpts[::-1]) if ckpts else []
            out[c["ckpt"]] = gr.update(choices=choices, value=choices[0] if choices else None)
            out[c["stop"]] = gr.update(interactive=active or info.state == "queued")
            out[c["force"]] = gr.update(visible=info.state == "stopping")
            out[c["resume"]] = gr.update(interactive=bool(ckpts) and not active and info.state != "queued")
        out[c["view"]] = {"card": card, "plots": sig, "log": log_sig, "controls": controls, "stage": (info.stage, lang_)}
        return out

    inputs = [c["run"], lang, c["view"], c["smoothing"], c["x_axis"], c["metric"], c["series"], c["shown"]]
    c["timer"].tick(tick, inputs, outputs, show_progress="hidden", queue=False)
    for widget in (c["smoothing"], c["x_axis"], c["metric"], c["series"]):  # redraw at once, not at the next tick
        widget.input(tick, inputs, outputs, show_progress="hidden", queue=False).then(
            tick, inputs, outputs, show_progress="hidden", queue=False)  # a chart emptied first is drawn now

    def save_plots(run_id, lang_):
        if not run_id:
            return message("warn", t(lang_, "runs.pick_first"))
        try:
            run_dir = m.run_dir(run_id)
        except RunError as err:
            return message("error", str(err))
        cfg = m.config(run_dir)
        written = save_run_plots(m.series(run_dir), run_dir, plot_words(lang_), cfg.method.stage if cfg else "")
        return message("ok", t(lang_, "plot.saved", n=len(written), path=str(written[0].parent)))

    c["save_plots"].click(save_plots, [c["run"], lang], c["plots_msg"], show_progress="hidden")
    c["run"].input(lambda r, lg: tick(r, lg, {}), [c["run"], lang], outputs, show_progress="hidden")

    def read_form(data):
        try:
            return ctx.config_from(data), None
        except ConfigError as err:
            return None, message("error", t(data[lang], "train.invalid"), problem_lines(err))

    def on_start(data):
        lg = data[lang]
        cfg, error = read_form(data)
        if error:
            gr.Warning(t(lg, "train.invalid"))
            return {c["train_msg"]: error}
        try:
            result = m.start(with_project_paths(cfg))
        except ConfigError as err:
            gr.Warning(t(lg, "train.invalid"))
            return {c["train_msg"]: message("error", t(lg, "train.invalid"), problem_lines(err))}
        except (RunError, OSError) as err:
            return {c["train_msg"]: message("error", t(lg, "train.start_failed"), [str(err)])}
        if result.queued:
            text = t(lg, "train.queued", run=result.id, others=", ".join(result.waiting_for))
            gr.Info(text)
            msg = message("info", text)
        else:
            msg = message("ok", t(lg, "train.started", run=result.id))
        return {c["train_msg"]: msg + warning_html(lg, cfg), c["run"]: gr.update(choices=run_choices(), value=result.id), c["view"]: {}}

    c["start"].click(on_start, fields | {lang}, [c["train_msg"], c["run"], c["view"]])
    c["run"].focus(lambda r: gr.update(choices=run_choices(), value=r), c["run"], c["run"], show_progress="hidden")

    def on_stop(run_id, lg, force=False):
        if not run_id:
            return message("warn", t(lg, "train.no_run_selected"))
        try:
            result = m.stop(run_id, force=force)
        except RunError as err:
            return message("error", str(err))
        return message("info" if result in ("stopping", "cancelled") else "warn", t(lg, f"train.stop_{result}", run=run_id)
                       if result in ("stopping", "cancelled") else t(lg, "train.not_running", run=run_id, state=result))

    c["stop"].click(on_stop, [c["run"], lang], c["train_msg"])
    c["force"].click(lambda r, lg: on_stop(r, lg, force=True), [c["run"], lang], c["train_msg"])

    def on_resume(run_id, ckpt, lg):
        if not run_id:
            return message("warn", t(lg, "train.no_run_selected")), gr.skip()
        try:
            result = m.resume(run_id, ckpt or "latest")
        except ConfigError as err:
            return message("error", t(lg, "train.invalid"), problem_lines(err)), gr.skip()
        except (RunError, OSError) as err:
            return message("error", t(lg, "train.start_failed"), [str(err)]), gr.skip()
        key = "train.resume_queued" if result.queued else "train.resumed"
        return message("info" if result.queued else "ok", t(lg, key, run=run_id, ckpt=ckpt or "latest",
                                                            others=", ".join(result.waiting_for))), {}

    c["resume"].click(on_resume, [c["run"], c["ckpt"], lang], [c["train_msg"], c["view"]])

    def on_preview(data):
        lg = data[lang]
        cfg, error = read_form(data)
        if error:
            return {c["preview_msg"]: error, c["preview_yaml"]: "", c["preview_cmd"]: ""}
        text, cmd, problems = preview(ctx, cfg)
        msg = message("warn", t(lg, "train.preview_problems"), problems) if problems else ""
        msg += warning_html(lg, cfg)
        if "--master_port AUTO" in cmd:
            msg += f'<div class="wb-hint">{t(lg, "train.preview_port")}</div>'

        return {c["preview_msg"]: msg, c["preview_yaml"]: text, c["preview_cmd"]: cmd}

    preview_out = [c["preview_msg"], c["preview_yaml"], c["preview_cmd"]]
    c["preview_btn"].click(on_preview, fields | {lang}, preview_out)
    c["train_tab"].select(on_preview, fields | {lang}, preview_out)
