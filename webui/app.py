"""build_app(ctx) -> gr.Blocks: the header with the language switch, and one tab per module."""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from engine.run.paths import PathPolicy, confine_process

from .context import Context
from .form import load_defaults
from .i18n import LANGUAGES, t
from .runs import RunManager
from .tabs import data, hparams, model, runs, train
from .tabs import evaluate as evaluate_tab, export as export_tab
from .tabs import chat as chat_tab

TABS = (model, data, hparams, train, runs, evaluate_tab, export_tab, chat_tab)
CSS = Path(__file__).with_name("style.css")


def theme() -> gr.themes.Base:
    system = ["-apple-system", "BlinkMacSystemFont", "Segoe UI", "Noto Sans", "PingFang SC", "Microsoft YaHei",
              "Helvetica Neue", "Arial", "sans-serif"]
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate", radius_size="md",
                          font=system, font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


def header_html(ctx: Context, lang: str) -> str:
    from engine.jobs.hub import offline

    devices = ", ".join(d.name for d in ctx.manager.devices)
    hub = t(lang, "app.hub_offline" if offline() else "app.hub_online")
    return (f'<div class="wb-header"><div class="wb-logo">◆</div><div><div class="wb-title">Workbench</div>'
            f'<div class="wb-tagline">{t(lang, "app.tagline")}</div></div>'
            f'<div class="wb-env"><span class="wb-chip">{t(lang, "app.devices")}: {devices}</span>'
            f'<span class="wb-chip" title="{ctx.workspace}">{t(lang, "app.workspace")}: {ctx.workspace}</span>'
            f'<span class="wb-chip" id="hub-mode" title="HF_HUB_OFFLINE">{hub}</span></div></div>')


def build_app(ctx: Context) -> gr.Blocks:
    with gr.Blocks(title="Workbench", fill_width=False) as demo:
        with gr.Row(equal_height=True, elem_classes="wb-top"):
            head = gr.HTML(header_html(ctx, ctx.lang), scale=1)
            lang = gr.Dropdown([(name, code) for code, name in LANGUAGES.items()], value=ctx.lang, label="Language / 语言",
                               elem_id="lang", scale=0, min_width=180, interactive=True)
        ctx.shared["lang"] = lang
        ctx.translate(head, value=lambda lg: header_html(ctx, lg))
        with gr.Tabs(selected="model", elem_id="tabs") as tabs:
            ctx.shared["tabs"] = tabs
            for tab in TABS:
                tab.build(ctx)
        for tab in TABS:
            tab.wire(ctx)

        targets = [comp for comp, _ in ctx.texts]

        def switch(lg):
            return ctx.language_updates(lg)

        event = lang.change(switch, lang, targets, show_progress="hidden")
        event.then(lambda: ({}, None), None, [ctx.shared["view"], ctx.shared["runs_sig"]])
        for fn, inputs, outputs in ctx.on_lang:
            event.then(fn, inputs, outputs, show_progress="hidden")

        c = ctx.shared

        def on_load():
            """A page opened while a run is active (or queued) goes straight to it, live."""
            run_id = train.pick_run(ctx)
            runs = ctx.manager.runs()
            live = any(r.id == run_id and r.state in ("queued", "starting", "running", "stopping") for r in runs)
            return (gr.update(choices=[r.id for r in runs], value=run_id),
                    gr.Tabs(selected="train") if live else gr.skip())

        demo.load(on_load, None, [c["run"], tabs])
        for fn, inputs, outputs, *triggers in ctx.on_load:
            # one listener for the page load and the widgets' own changes: its events run in order, so a slow
            # answer for the page's first values can never land after (and over) the answer for a user's edit
            gr.on([demo.load, *(triggers[0] if triggers else ())], fn, inputs, outputs, trigger_mode="always_last",
                  show_progress="hidden")
    return demo


def create(workspace: str | Path, lang: str = "en", data_roots: list[str] = ()) -> tuple[gr.Blocks, Context]:
    """The app and its context for a workspace (the run manager's queue thread is started); ``data_roots`` are
    folders the page may use besides the project, the workspace and the configured ones (engine.run.paths)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    manager = RunManager(workspace)
    manager.start_background()
    ctx = Context(manager=manager, defaults=load_defaults(), lang=lang,
                  policy=PathPolicy.for_workspace(manager.workspace, data_roots))
    confine_process(ctx.policy)  # what the page reaches through a registry or a config is confined too
    return build_app(ctx), ctx


def launch_kwargs(ctx: Context) -> dict:
    # Only saved configs may be downloaded; run directories (logs, weights) are never served as files.
    configs = ctx.workspace / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    return dict(theme=theme(), css=CSS.read_text(encoding="utf-8"), allowed_paths=[str(configs)],
                footer_links=["settings"], run_history=False)
