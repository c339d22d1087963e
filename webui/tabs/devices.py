"""The Devices part of the Hyperparameters tab: this machine's GPUs, or several machines (a hostfile, chosen or
uploaded, or a node table with the slots to use), and the ZeRO stage and offload for both.

Every widget is still the form's (``form.build``: derived from the distributed section of the run config); this
module only groups them under a switch and fills the node table from a hostfile. The switch is no config field:
a config names several machines exactly when it has a hostfile or nodes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from engine.run.nodes import NodeError, parse_hostfile
from engine.run.paths import PathPolicy, PathRefused

from .. import form
from ..i18n import t
from ..views import message

LOCAL = ("distributed.devices", "distributed.num_processes")
SEVERAL = ("distributed.hostfile", "distributed.nodes", "distributed.launcher", "distributed.master_addr",
           "distributed.master_port", "distributed.timeout")
FOLDER = "hostfiles"  # uploaded hostfiles land in <workspace>/hostfiles/


def several(values: dict) -> bool:
    return bool(values.get("distributed.nodes")) or bool((values.get("distributed.hostfile") or "").strip())


def rows_of_file(text: str, source: str, rows) -> list[list]:
    """The node table of a hostfile's text, keeping the slots to use already typed for a host."""
    use = {str(r[0]).strip(): r[2] for r in form._table_rows(rows) if len(r) > 2 and r[0]}
    return [[h, n, use.get(h, "") or ""] for h, n in parse_hostfile(text, source, quote=False).items()]


def keep_upload(workspace: Path, upload: str) -> Path:
    """Copy an uploaded hostfile into the workspace (``hostfiles/``), under a name not taken by another file."""
    src = Path(upload)
    folder = workspace / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    dest, n = folder / src.name, 1
    while dest.exists() and dest.read_bytes() != src.read_bytes():
        dest, n = folder / f"{src.stem}-{n}{src.suffix}", n + 1
    shutil.copyfile(src, dest)
    return dest


def build(ctx, keys: list[str]) -> None:
    c, lang = ctx.shared, ctx.lang
    multi = several(ctx.values)
    c["dev_mode"] = ctx.translate(
        gr.Radio([(t(lang, "devices.local"), "local"), (t(lang, "devices.several"), "several")],
                 value="several" if multi else "local", label=t(lang, "devices.mode"), elem_id="devices-mode"),
        label="devices.mode", choices=lambda lg: [(t(lg, "devices.local"), "local"), (t(lg, "devices.several"), "several")])
    with gr.Row(equal_height=False, visible=not multi) as local:
        for key in (k for k in keys if k in LOCAL):
            form.build(ctx, key)
    with gr.Column(visible=multi) as nodes:
        with gr.Row(equal_height=True):
            form.build(ctx, "distributed.hostfile", scale=4)
            c["hostfile_upload"] = ctx.translate(
                gr.UploadButton(t(lang, "devices.upload"), elem_id="btn-hostfile-upload", size="md", scale=0, min_width=160),
                label="devices.upload")
        c["devices_msg"] = gr.HTML("", elem_id="devices-msg")
        form.build(ctx, "distributed.nodes")
        with gr.Row(equal_height=False):
            for key in (k for k in keys if k in SEVERAL and k not in ("distributed.hostfile", "distributed.nodes")):
                form.build(ctx, key)
    with gr.Row(equal_height=False):
        for key in (k for k in keys if k not in LOCAL + SEVERAL):
            form.build(ctx, key)
    c["dev_local"], c["dev_several"] = local, nodes


def wire(ctx) -> None:
    c, f, lang = ctx.shared, ctx.fields, ctx.shared["lang"]
    hostfile, table = f["distributed.hostfile"], f["distributed.nodes"]

    def show(mode):
        return gr.update(visible=mode != "several"), gr.update(visible=mode == "several")

    c["dev_mode"].change(show, c["dev_mode"], [c["dev_local"], c["dev_several"]], show_progress="hidden")
    # switched back to this machine by hand: the hidden node settings must not apply
    c["dev_mode"].input(lambda mode: (gr.skip(), gr.skip()) if mode == "several" else ("", []),
                        c["dev_mode"], [hostfile, table], show_progress="hidden")

    def on_hostfile(path, rows, lg):
        """A hostfile chosen (typed, or set by Load / Upload): its nodes fill the table, the switch follows."""
        path = (path or "").strip()
        if not path:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            file = ctx.policy.check(path)  # resolved as the run config resolves it (engine.run.paths.locate)
            if not file.is_file():
                return gr.skip(), "several", ""  # Preview and Start name the missing file
            new = rows_of_file(file.read_text(encoding="utf-8"), str(file), rows)
        except (PathRefused, NodeError, OSError, UnicodeDecodeError) as err:
            return gr.skip(), "several", message("error", t(lg, "devices.hostfile_bad"), [str(err)])
        return new, "several", message("ok", t(lg, "devices.hostfile_read", path=str(file), n=len(new)))

    hostfile.change(on_hostfile, [hostfile, table, lang], [table, c["dev_mode"], c["devices_msg"]], show_progress="hidden")

    # an upload lies in Gradio's upload folder (a path sent through the API in its place is refused); it is kept in
    # the workspace, whose copy the run config names
    uploads = PathPolicy((Path(get_upload_folder()),))

    def on_upload(file, rows, lg):
        try:
            uploads.check(file)
            new = rows_of_file(Path(file).read_text(encoding="utf-8"), Path(file).name, rows)
            dest = keep_upload(ctx.workspace, file)
            ctx.policy.check(str(dest))
        except (PathRefused, NodeError, OSError, UnicodeDecodeError, TypeError) as err:
            return gr.skip(), gr.skip(), gr.skip(), message("error", t(lg, "devices.hostfile_bad"), [str(err)])
        return str(dest), new, "several", message("ok", t(lg, "devices.hostfile_read", path=str(dest), n=len(new)))

    c["hostfile_upload"].upload(on_upload, [c["hostfile_upload"], table, lang],
                                [hostfile, table, c["dev_mode"], c["devices_msg"]], show_progress="hidden")

    def on_table(rows):
        """Nodes in the table (typed, loaded or from a hostfile): the switch shows several machines."""
        try:
            named = any(str(r[0] or "").strip() for r in form._table_rows(rows) if r)
        except (TypeError, form.ConfigError):
            named = False
        return "several" if named else gr.skip()

    table.change(on_table, table, c["dev_mode"], show_progress="hidden")
