"""Hyperparameters tab: every other run-config field (basic on top, the rest in accordions), and
Save / Load / Reset of the whole form as a run-config YAML."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from engine.run.config import ConfigError, dump_config, load_config
from engine.run.paths import PathPolicy

from .. import form
from ..i18n import t
from ..views import message
from . import devices
from .train import problem_lines

PER_ROW = 4


def _grid(ctx, keys: list[str]) -> None:
    stage = ctx.values["method.stage"]
    for i in range(0, len(keys), PER_ROW):
        with gr.Row(equal_height=False):
            for key in keys[i:i + PER_ROW]:
                extra = {"choices": reward_models(ctx.workspace)} if key == "method.reward_model" else {}
                form.build(ctx, key, visible=form.visible_for(key, stage), **extra)


def reward_models(workspace: Path) -> list[tuple[str, str]]:
    """(label, path) of the final/ and checkpoint-N/ directories of the workspace's rm runs, newest first."""
    from engine.run.checkpoint import workspace_checkpoints

    return workspace_checkpoints(workspace, reward=True)


def stage_keys(ctx) -> list[str]:
    """Fields shown only for some stages (method.beta, reward_model, ...)."""
    return [k for k in ctx.field_list() if form.stages_of(k) is not None]


def config_path(lang: str, text: str, workspace: Path, must_exist: bool, policy=None) -> Path:
    """A typed config path, validated: a .yaml file (relative paths live in the workspace) inside the folders of
    the page's ``policy`` (engine.run.paths)."""
    text = (text or "").strip()
    if not text:
        raise ValueError(t(lang, "hparams.path_empty"))
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = workspace / path
    if policy is not None:
        policy.check(text, base=workspace)  # PathRefused (a ValueError) outside the policy's folders
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(t(lang, "hparams.path_suffix", path=path))
    if path.is_dir():
        raise ValueError(t(lang, "hparams.path_is_dir", path=path))
    if must_exist and not path.is_file():
        raise ValueError(t(lang, "hparams.path_missing", path=path))
    return path


def build(ctx) -> None:
    c = ctx.shared
    with gr.Tab(ctx.t("tabs.hparams"), id="hparams") as tab:
        ctx.translate(tab, label="tabs.hparams")
        with gr.Row(equal_height=False, elem_classes="wb-toolbar"):
            c["cfg_path"] = ctx.translate(
                gr.Textbox(str(ctx.workspace / "configs" / "my-run.yaml"), label=ctx.t("hparams.cfg_path"),
                           info=ctx.t("hparams.cfg_path_info"), scale=5, elem_id="cfg-path"),
                label="hparams.cfg_path", info="hparams.cfg_path_info")
            small = dict(size="md", scale=0, min_width=130)
            c["save"] = ctx.translate(gr.Button(ctx.t("hparams.save"), elem_id="btn-save", **small), value="hparams.save")
            c["load"] = ctx.translate(gr.Button(ctx.t("hparams.load"), elem_id="btn-load", **small), value="hparams.load")
            c["upload"] = ctx.translate(gr.UploadButton(ctx.t("hparams.upload"), file_types=[".yaml", ".yml"],
                                                        elem_id="btn-upload", **small), label="hparams.upload")
            c["reset"] = ctx.translate(gr.Button(ctx.t("hparams.reset"), elem_id="btn-reset", **small), value="hparams.reset")
            c["download"] = gr.DownloadButton(ctx.t("hparams.download"), visible=False, **small)
        c["cfg_msg"] = gr.HTML("", elem_id="cfg-msg")
        layout = ctx.layout["hparams"]
        _grid(ctx, layout["basic"])
        for group, keys in layout["groups"].items():
            shown = any(form.visible_for(k, ctx.values["method.stage"]) for k in keys)
            with gr.Accordion(ctx.t(f"hparams.group.{group}"), open=group in ("lora", "stage"), elem_id=f"acc-{group}",
                              visible=shown) as acc:
                ctx.translate(acc, label=f"hparams.group.{group}")
                if group == "distributed":
                    devices.build(ctx, keys)
                else:
                    _grid(ctx, keys)
            c[f"acc_{group}"] = acc


def wire(ctx) -> None:
    c, f, lang = ctx.shared, ctx.fields, ctx.shared["lang"]
    fields = set(f.values())
    keys = ctx.field_list()

    def on_save(data):
        lg = data[lang]
        try:
            cfg = ctx.config_from(data)
        except ConfigError as err:
            return message("error", t(lg, "train.invalid"), problem_lines(err)), gr.update(visible=False)
        try:
            path = config_path(lg, data[c["cfg_path"]], ctx.workspace, must_exist=False, policy=ctx.policy)
            path.parent.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, path)
        except (ValueError, OSError) as err:
            return message("error", t(lg, "hparams.save_failed"), [str(err)]), gr.update(visible=False)
        downloadable = path.resolve().is_relative_to((ctx.workspace / "configs").resolve())
        return (message("ok", t(lg, "hparams.saved", path=path)),
                gr.update(value=str(path), visible=True, label=t(lg, "hparams.download")) if downloadable else gr.update(visible=False))

    c["save"].click(on_save, fields | {lang, c["cfg_path"]}, [c["cfg_msg"], c["download"]])

    def apply(lg, cfg, done: str):
        values = form.to_values(cfg, ctx.manager.devices)
        out = {f[k]: values[k] for k in keys}
        out[c["cfg_msg"]] = message("ok", done)
        return out

    def load_from(lg, path_text, policy):
        try:
            path = config_path(lg, path_text, ctx.workspace, True, policy)
            cfg = load_config(path)
        except (ValueError, OSError) as err:
            lines = problem_lines(err) if isinstance(err, ConfigError) else [str(err)]
            return {c["cfg_msg"]: message("error", t(lg, "hparams.load_failed"), lines)}
        return apply(lg, cfg, t(lg, "hparams.loaded", path=path))

    outputs = [f[k] for k in keys] + [c["cfg_msg"]]
    c["load"].click(lambda lg, p: load_from(lg, p, ctx.policy), [lang, c["cfg_path"]], outputs)
    # an upload lies in Gradio's upload folder; a path sent through the API in its place is refused
    uploads = PathPolicy((Path(get_upload_folder()),))
    c["upload"].upload(lambda lg, file: load_from(lg, file, uploads), [lang, c["upload"]], outputs)
    c["reset"].click(lambda lg: apply(lg, ctx.defaults, t(lg, "hparams.reset_done")), [lang], outputs)

    # The stage's own fields (and their accordion) show only while that stage is chosen.
    only = stage_keys(ctx)
    stage_groups = [g for g, ks in ctx.layout["hparams"]["groups"].items() if all(k in only for k in ks)]

    def on_stage(stage):
        out = [gr.update(visible=form.visible_for(k, stage),
                         **({"choices": reward_models(ctx.workspace)} if k == "method.reward_model" else {})) for k in only]
        return out + [gr.update(visible=any(form.visible_for(k, stage) for k in ctx.layout["hparams"]["groups"][g]))
                      for g in stage_groups]

    f["method.stage"].change(on_stage, f["method.stage"], [f[k] for k in only] + [c[f"acc_{g}"] for g in stage_groups],
                             show_progress="hidden")

    def on_devices(selected):
        ids = [d for d in (selected or []) if d != "cpu"]
        return len(ids) if ids else gr.skip()

    if ctx.manager.gpus:
        f["distributed.devices"].input(on_devices, f["distributed.devices"], f["distributed.num_processes"])
    devices.wire(ctx)
