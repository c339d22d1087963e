"""Data tab: the stage, the datasets it accepts, and a preview (count + first examples as conversations);
below it, the "Add a dataset" panel (``data_add``)."""

from __future__ import annotations

import threading
from itertools import islice
from pathlib import Path

import gradio as gr

from engine.data import DataError, load_registry, normalize, read_records, resolve_dataset
from engine.run.stages import STAGE_KINDS

from .. import form
from ..i18n import t
from ..views import esc, message
from . import data_add

PREVIEW_ROWS = 3
COUNT_CAP = 200_000
_counts: dict[tuple[str, float, int], int] = {}
_count_lock = threading.Lock()


def count_records(path: Path) -> int:
    """Records in a data file (streamed; cached per file version; capped at COUNT_CAP)."""
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    with _count_lock:
        if key not in _counts:
            _counts[key] = sum(1 for _ in islice(read_records(path), COUNT_CAP))
        return _counts[key]


def dataset_choices(registry: str, stage: str) -> tuple[list[tuple[str, str]], str | None]:
    """(label, name) of the registered datasets the stage can train on, and the registry's problem if any."""
    need = STAGE_KINDS.get(stage)
    try:
        specs = load_registry(registry)
    except DataError as err:
        return [], str(err)
    return [(name, name) for name, s in specs.items() if need is None or s.kind == need], None


def preview_html(lang: str, stage: str, names: list[str], registry: str) -> str:
    if not names:
        return message("warn", t(lang, "data.none_selected"))
    need = STAGE_KINDS.get(stage)
    blocks = []
    total = 0
    for name in names:
        try:
            spec = resolve_dataset(name, registry)
            count = count_records(spec.path)
        except (DataError, OSError) as err:
            blocks.append(message("error", t(lang, "data.cannot_read", name=name), [str(err)]))
            continue
        total += count
        head = (f'<div class="wb-ds-head"><b>{esc(spec.name)}</b><span class="wb-chip">{esc(spec.kind)}</span>'
                f'<span class="wb-chip">{esc(spec.format)}</span><span class="wb-chip" data-count="{count}">'
                f'{esc(t(lang, "data.count", n=f"{count:,}"))}</span></div>'
                f'<div class="wb-hint">{esc(spec.description or spec.path)}</div>')
        if need and spec.kind != need:
            head += message("warn", t(lang, "data.wrong_kind", name=name, kind=spec.kind, stage=stage, need=need))
        examples = []
        try:
            for line, record in read_records(spec.path, PREVIEW_ROWS):
                examples.append(_example(record, spec))
        except DataError as err:
            examples.append(message("error", t(lang, "data.bad_row"), [str(err)]))
        blocks.append(f'<div class="wb-card wb-ds">{head}{"".join(examples)}</div>')
    summary = f'<div class="wb-subtitle" id="data-total" data-total="{total}">{esc(t(lang, "data.total", n=f"{total:,}"))}</div>'
    return summary + "".join(blocks)


def _example(record, spec) -> str:
    try:
        return data_add.example_html(normalize(record, spec.format, spec.columns))
    except DataError as err:
        return message("error", str(err))


def build(ctx) -> None:
    c = ctx.shared
    with gr.Tab(ctx.t("tabs.data"), id="data") as tab:
        ctx.translate(tab, label="tabs.data")
        with gr.Row():
            with gr.Column(scale=2):
                form.build(ctx, "method.stage")
                choices, problem = dataset_choices(ctx.values["data.registry"], ctx.values["method.stage"])
                form.build(ctx, "data.datasets", choices=choices)
                c["registry_msg"] = gr.HTML(message("error", ctx.t("data.bad_registry"), [problem]) if problem else "",
                                            elem_id="registry-msg")
                form.build_advanced(ctx, "data")
            with gr.Column(scale=3):
                c["data_preview"] = gr.HTML("", elem_id="data-preview")
        data_add.build(ctx)


def wire(ctx) -> None:
    c, f, lang = ctx.shared, ctx.fields, ctx.shared["lang"]

    def refresh_choices(lg, registry, stage, chosen):
        choices, problem = dataset_choices(registry, stage)
        names = {v for _, v in choices}
        keep = [d for d in (chosen or []) if d in names or Path(d).suffix]  # typed file paths stay
        msg = message("error", t(lg, "data.bad_registry"), [problem]) if problem else ""
        # the value is only set when something must go: an unchanged one may be older than the page's
        # (the Add panel's Save sets the registry and a new selection at once)
        return gr.update(choices=choices, **({"value": keep} if keep != list(chosen or []) else {})), msg

    for comp in (f["data.registry"], f["method.stage"]):
        comp.change(refresh_choices, [lang, f["data.registry"], f["method.stage"], f["data.datasets"]],
                    [f["data.datasets"], c["registry_msg"]], show_progress="hidden")
    inputs = [lang, f["method.stage"], f["data.datasets"], f["data.registry"]]
    ctx.on_load.append((preview_html, inputs, c["data_preview"], [f["data.datasets"].change]))
    ctx.on_lang.append((preview_html, inputs, c["data_preview"]))
    data_add.wire(ctx, dataset_choices)
