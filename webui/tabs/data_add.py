"""The Data tab's "Add a dataset" panel: upload or point to data, detect or choose the format, map columns,
validate every record, preview the tokens the trainer will see (trained ones highlighted), a length
histogram with the cutoff, and Save to the workspace's registry, after which the dataset is selected.

All the work is done by ``engine.data.inspection`` (the functions ``workbench data inspect|add`` call);
this module only turns its results into widgets.
"""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from engine.data import DataError, TemplateError, get_template, label_spans
from engine.data.encode import IGNORE_INDEX
from engine.data.formats import FORMAT_FIELDS, FORMATS, KIND_OF_FORMAT, REQUIRED_FIELDS
from engine.data.inspection import (Source, add_dataset, columns_of, detect_source, encode_example, inspect_source,
                                    open_source, token_lengths)
from engine.data.registry import CANONICAL_FIELDS, PROJECT_REGISTRY, find_path, workspace_registry
from engine.run.paths import PathPolicy, PathRefused
from engine.data.readers import SAMPLE_BY
from engine.run.stages import STAGE_KINDS

from .. import chatfmt, plots
from ..i18n import t
from ..modelinfo import ModelPathError, resolve_model_path
from ..views import conversation, esc, message

CHECK_RECORDS = 200_000  # the page checks this many records at most (Save checks them all)
PREVIEW = 5
SAMPLE = 1000
FILE_TYPES = [".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt"]


def uploaded(path: str) -> Path:
    """A file the page received as an upload: it must lie in Gradio's upload folder (a path sent through the API
    instead of a file is refused like any other path outside the page's folders)."""
    policy = PathPolicy((Path(get_upload_folder()),))
    if not policy.allows(Path(path)):
        raise DataError(str(policy.refusal(path)), field="upload")
    return Path(path)


def _source(state: dict, policy: PathPolicy, sample_by: str = "line") -> Source:
    """The source a check or save reads, its path checked again (an upload in Gradio's folder, else the policy)."""
    if state.get("hub"):
        return Source(hub=state["hub"])
    if state.get("upload"):
        return Source(path=uploaded(state["path"]), sample_by=sample_by)
    try:
        return Source(path=policy.check(state["path"], "path"), sample_by=sample_by)
    except PathRefused as err:
        raise DataError(str(err), field="path") from None


def _fields(fmt: str) -> tuple[str, ...]:
    return FORMAT_FIELDS.get(fmt, ())


def mapping_of(state: dict, fmt: str, values) -> dict[str, str]:
    """{canonical field: file column} of the mapping dropdowns that the format (or the detected one) uses and that are set."""
    used = _fields(fmt if fmt != "auto" else state.get("detected") or "")
    return {f: v for f, v in zip(CANONICAL_FIELDS, values) if v and f in used}


def suggested_name(text: str) -> str:
    """A registry name from a file, directory or Hub name: its last part without the data suffix."""
    name = Path(text.rstrip("/")).name
    name = Path(name).stem if Path(name).suffix.lower() in FILE_TYPES else name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-")[:64] or "my_data"


def mapping_updates(lang: str, fmt: str, columns: list[str] | None = None, reset: bool = False) -> list:
    """One update per mapping dropdown: shown when the format reads that field, filled with the file's columns."""
    out = []
    required = REQUIRED_FIELDS.get(fmt, ())
    for f in CANONICAL_FIELDS:
        kw = dict(visible=f in _fields(fmt), label=f"{f} *" if f in required else f)
        if columns is not None:
            kw["choices"] = [(t(lang, "data.add.same_name"), "")] + [(c, c) for c in columns]
        if reset:
            kw["value"] = ""
        out.append(gr.update(**kw))
    return out


def format_choices(lang: str, detected: str | None) -> list[tuple[str, str]]:
    auto = t(lang, "data.add.auto_detected", fmt=detected) if detected else t(lang, "data.add.auto_unknown")
    return [(auto, "auto")] + [(f"{f} ({KIND_OF_FORMAT[f]})", f) for f in FORMATS]


# ------------------------------------------------------------------ HTML


def report_html(lang: str, report) -> str:
    """Counts, format and kind, notes, and the table of unusable records."""
    if report.format:
        how = t(lang, "data.add.detected" if report.detected else "data.add.chosen", fmt=report.format, kind=report.kind)
    else:
        how = ""
    counts = t(lang, "data.add.counts", records=f"{report.records:,}", valid=f"{report.valid:,}",
               bad=f"{report.error_count:,}")
    kind = "ok" if report.ok else "error" if report.fatal or not report.valid else "warn"
    title = t(lang, "data.add.all_usable" if report.ok else "data.add.stopped" if report.fatal else "data.add.not_all_usable")
    notes = ([] if report.complete else [t(lang, "data.add.partial", n=f"{report.records:,}")]) + report.notes
    head = (f'<div class="wb-ds-head" id="data-check-head" data-records="{report.records}" data-valid="{report.valid}" '
            f'data-errors="{report.error_count}" data-format="{esc(report.format)}">'
            f'<span class="wb-chip">{esc(how)}</span><span class="wb-chip">{esc(counts)}</span></div>')
    rows = [(e, "") for e in report.errors] + ([(report.fatal, t(lang, "data.add.fatal"))] if report.fatal else [])
    table = ""
    if rows:
        cells = "".join(f'<tr><td>{esc(Path(e.file).name if e.file else "")}</td><td>{e.line or ""}</td>'
                        f'<td>{esc(e.field or "")}</td><td>{esc(e.message)}{" — " + esc(extra) if extra else ""}</td></tr>'
                        for e, extra in rows)
        heads = "".join(f"<th>{esc(t(lang, k))}</th>" for k in ("data.add.col_file", "data.add.col_line",
                                                                  "data.add.col_field", "data.add.col_problem"))
        more = report.error_count - len(report.errors)
        tail = f'<div class="wb-hint">{esc(t(lang, "data.add.more", n=f"{more:,}"))}</div>' if more > 0 else ""
        table = f'<table class="wb-table" id="data-errors"><thead><tr>{heads}</tr></thead><tbody>{cells}</tbody></table>{tail}'
    return f'<div class="wb-card" id="data-report">{head}{message(kind, title, notes)}{table}</div>'


def example_html(example: dict) -> str:
    """A canonical example rendered as a conversation (used by the dataset preview too)."""
    if "messages" in example:
        tools = [t["function"]["name"] for t in example.get("tools") or ()]
        shown = [{"role": "tools", "content": ", ".join(tools)}] if tools else []
        return conversation(shown + example["messages"])
    if "chosen" in example:
        return conversation(example["prompt"], [("chosen ✓", example["chosen"]), ("rejected ✗", example["rejected"])])
    if "completion" in example:
        mark = "✓" if example["label"] else "✗"
        return conversation(example["prompt"], [(f"completion {mark}", example["completion"])])
    return f'<div class="wb-convo"><div class="wb-text">{esc(example.get("text", ""))}</div></div>'


def tokens_html(lang: str, tokenizer, parts: list[tuple[str, dict]], cutoff: int) -> str:
    """Each encoded part: its token counts and its text in runs, trained (label) tokens highlighted."""
    blocks, seen = [], {}
    for part, enc in parts:
        seen[part] = seen.get(part, 0) + 1
        n, trained = len(enc["input_ids"]), sum(label != IGNORE_INDEX for label in enc["labels"])
        name = t(lang, f"data.add.part.{part}") if part else ""
        if sum(p == part for p, _ in parts) > 1:
            name = f"{name} · {t(lang, 'data.add.turn', n=seen[part])}".strip(" ·")
        counts = t(lang, "data.add.token_counts", tokens=f"{n:,}", trained=f"{trained:,}")
        head = f'<div class="wb-tok-head"><b>{esc(name)}</b><span class="wb-chip">{esc(counts)}</span></div>'
        if n:
            body = "".join(f'<span class="{"wb-trained" if tr else "wb-masked"}">{esc(text)}</span>'
                           for text, tr in label_spans(tokenizer, enc))
            body = f'<div class="wb-tok-body">{body}</div>'
        else:
            body = message("warn", t(lang, "data.add.nothing_fits", cutoff=cutoff))
        blocks.append(f'<div class="wb-tokens" data-tokens="{n}" data-trained="{trained}">{head}{body}</div>')
    legend = (f'<div class="wb-hint wb-tok-legend"><span class="wb-trained">{esc(t(lang, "data.add.trained"))}</span> '
              f'<span class="wb-masked">{esc(t(lang, "data.add.masked"))}</span></div>')
    return legend + "".join(blocks)


def _tokenizer(lang: str, model: str, template: str, policy=None):
    """(tokenizer, template) of the form's model, or (None, a message why not)."""
    try:
        tok = chatfmt.tokenizer(resolve_model_path(model, policy))
        return tok, get_template(template, tok)
    except (ModelPathError, TemplateError, OSError, ValueError) as err:
        return None, message("warn", t(lang, "data.add.no_tokens"), [str(err)])


def preview_html(lang: str, pending: dict, index, model: str, template: str, cutoff, multiturn: str, policy=None) -> str:
    """Example ``index`` (1-based) rendered as a conversation and as the tokens the trainer will see."""
    examples = pending.get("examples") or []
    if not examples:
        return ""
    line, example = examples[min(max(int(index or 1), 1), len(examples)) - 1]
    where = t(lang, "data.add.example_at", line=line)
    html = f'<div class="wb-card" id="data-example"><div class="wb-hint">{esc(where)}</div>{example_html(example)}'
    tok, template_ = _tokenizer(lang, model, template, policy)
    if tok is None:
        return html + template_ + "</div>"
    cutoff = int(cutoff or 1)
    try:
        parts = encode_example(example, pending["kind"], tok, template_, cutoff, multiturn or "all")
    except (DataError, TemplateError) as err:
        return html + message("error", t(lang, "data.add.cannot_encode"), [str(err)]) + "</div>"
    title = t(lang, "data.add.tokens_title", model=Path(model).name, template=template, cutoff=cutoff)
    return html + f'<div class="wb-subtitle">{esc(title)}</div>' + tokens_html(lang, tok, parts, cutoff) + "</div>"


def lengths_view(lang: str, pending: dict, model: str, template: str, cutoff, policy=None):
    """(figure or None, one line of truncation counts)."""
    sample = pending.get("sample") or []
    tok, template_ = _tokenizer(lang, model, template, policy) if sample else (None, "")
    if tok is None:
        return None, template_
    cutoff = int(cutoff or 1)
    try:
        lengths = token_lengths(sample, pending["kind"], tok, template_, cutoff, pending["valid"])
    except (DataError, TemplateError) as err:
        return None, message("error", t(lang, "data.add.cannot_encode"), [str(err)])
    which = (t(lang, "data.add.sampled", n=f"{lengths.count:,}", total=f"{lengths.population:,}") if lengths.sampled
             else t(lang, "data.add.all_of", n=f"{lengths.count:,}"))
    cut = (t(lang, "data.add.packed", cutoff=cutoff, truncated=f"{lengths.truncated:,}") if lengths.packed else
           t(lang, "data.add.truncation", cutoff=cutoff, truncated=f"{lengths.truncated:,}", lost=f"{lengths.lost:,}"))
    words = {k: t(lang, f"data.add.plot.{k}") for k in ("title", "tokens", "examples", "empty", "total", "prompt", "response")}
    words["title"] += f" ({which})"
    words["cutoff"] = f"cutoff_len {cutoff}"
    fig = plots.length_figure(lengths.prompt, lengths.response, cutoff, words)
    kind = "warn" if lengths.truncated else "ok"
    return fig, (f'<div id="data-lengths" data-truncated="{lengths.truncated}" data-lost="{lengths.lost}" '
                 f'data-count="{lengths.count}">{message(kind, cut)}</div>')


# ------------------------------------------------------------------ layout and events


def build(ctx) -> None:
    c = ctx.shared
    tr = ctx.translate
    with gr.Accordion(ctx.t("data.add.title"), open=False, elem_id="data-add") as acc:
        tr(acc, label="data.add.title")
        with gr.Row(equal_height=False):
            c["add_upload"] = tr(gr.File(label=ctx.t("data.add.upload"), file_types=FILE_TYPES, type="filepath",
                                         elem_id="data-upload", height=120, scale=2), label="data.add.upload")
            with gr.Column(scale=3):
                c["add_path"] = tr(gr.Textbox(label=ctx.t("data.add.path"), info=ctx.t("data.add.path_info"),
                                              elem_id="data-path"), label="data.add.path", info="data.add.path_info")
                c["add_load"] = tr(gr.Button(ctx.t("data.add.load"), size="sm", elem_id="btn-data-load"),
                                   value="data.add.load")
        with gr.Row(equal_height=False):
            c["add_format"] = tr(gr.Dropdown(format_choices(ctx.lang, None), value="auto", label=ctx.t("data.add.format"),
                                             info=ctx.t("data.add.format_info"), elem_id="data-format", scale=1),
                                 label="data.add.format", info="data.add.format_info")
            c["add_kind"] = tr(gr.Textbox("", label=ctx.t("data.add.kind"), interactive=False, elem_id="data-kind",
                                          scale=1), label="data.add.kind")
            c["add_sample_by"] = tr(gr.Dropdown(list(SAMPLE_BY), value="line", label=ctx.t("data.add.sample_by"),
                                                info=ctx.t("data.add.sample_by_info"), elem_id="data-sample-by", scale=1),
                                    label="data.add.sample_by", info="data.add.sample_by_info")
        c["add_map_title"] = tr(gr.Markdown(ctx.t("data.add.mapping")), value="data.add.mapping")
        with gr.Row(elem_id="data-mapping"):
            c["add_maps"] = [gr.Dropdown([(ctx.t("data.add.same_name"), "")], value="", label=f, visible=False,
                                         elem_id=f"map-{f}", min_width=160) for f in CANONICAL_FIELDS]
        c["add_check"] = tr(gr.Button(ctx.t("data.add.check"), variant="secondary", elem_id="btn-data-check"),
                            value="data.add.check")
        c["add_report"] = gr.HTML("", elem_id="data-check")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                c["add_example_no"] = tr(gr.Slider(1, PREVIEW, value=1, step=1, label=ctx.t("data.add.example"),
                                                   visible=False, elem_id="data-example-no"), label="data.add.example")
                c["add_preview"] = gr.HTML("", elem_id="data-token-preview")
            with gr.Column(scale=2):
                c["add_plot"] = gr.Plot(show_label=False, elem_id="data-hist", format="png")
                c["add_lengths"] = gr.HTML("", elem_id="data-lengths-box")
        with gr.Row(equal_height=False, elem_classes="wb-toolbar"):
            c["add_name"] = tr(gr.Textbox(label=ctx.t("data.add.name"), info=ctx.t("data.add.name_info"),
                                          elem_id="data-name", scale=2), label="data.add.name", info="data.add.name_info")
            c["add_desc"] = tr(gr.Textbox(label=ctx.t("data.add.description"), elem_id="data-desc", scale=3),
                               label="data.add.description")
            c["add_skip"] = tr(gr.Checkbox(False, label=ctx.t("data.add.skip"), elem_id="data-skip", scale=1),
                               label="data.add.skip")
            c["add_save"] = tr(gr.Button(ctx.t("data.add.save"), variant="primary", elem_id="btn-data-save", scale=0,
                                         min_width=160), value="data.add.save")
        c["add_msg"] = gr.HTML("", elem_id="data-save-msg")
        c["add_source"] = gr.State({})  # {"path": str, "upload": bool} or {"hub": name}, and "detected": format
        c["add_pending"] = gr.State({})  # the last check: kind, valid count, first examples, the statistics sample


def wire(ctx, dataset_choices) -> None:
    """``dataset_choices(registry, stage)`` gives the Datasets dropdown's choices (the Data tab's own function)."""
    c, f, lang = ctx.shared, ctx.fields, ctx.shared["lang"]
    maps = c["add_maps"]
    roots = list(ctx.policy.roots)
    ws_registry = workspace_registry(ctx.workspace)
    if ws_registry.is_file():  # Reset (Hyperparameters) returns to the registry that holds the user's datasets
        ctx.defaults.data.registry = str(ws_registry)

    def load(lg, upload, text):
        """A new source: its columns fill the mapping dropdowns; the format is detected when it can be."""
        try:
            if upload:
                source, state = Source(path=uploaded(upload)), {"path": str(upload), "upload": True}
            else:
                source = open_source(text, roots)
                state = {"hub": source.hub} if source.hub else {"path": str(source.path), "upload": False}
        except DataError as err:
            return [{}, message("error", t(lg, "data.add.cannot_open"), [str(err)]), gr.skip(), gr.skip(),
                    gr.skip()] + [gr.skip()] * len(maps)
        try:
            detected = detect_source(source)
        except DataError:
            detected = None  # the check that follows says why
        state["detected"] = detected
        columns = columns_of(source)
        name = suggested_name(Path(upload).name if upload else text.strip())
        return ([state, "", gr.update(choices=format_choices(lg, detected), value="auto"), name,
                 KIND_OF_FORMAT.get(detected, "")] + mapping_updates(lg, detected or "", columns, reset=True))

    load_outputs = [c["add_source"], c["add_msg"], c["add_format"], c["add_name"], c["add_kind"]] + maps
    check_inputs = [lang, c["add_source"], c["add_format"], f["model.path"], f["model.template"], f["data.cutoff_len"],
                    f["data.multiturn_loss"], c["add_sample_by"]] + maps
    check_outputs = [c["add_report"], c["add_pending"], c["add_example_no"], c["add_preview"], c["add_plot"],
                     c["add_lengths"], c["add_kind"]]

    def check(lg, state, fmt, model, template, cutoff, multiturn, sample_by, *values):
        """Validate every record (up to CHECK_RECORDS), then preview example 1 and the length histogram."""
        if not state:
            return message("warn", t(lg, "data.add.no_source")), {}, gr.update(visible=False), "", None, "", ""
        try:
            source = _source(state, ctx.policy, sample_by)
        except DataError as err:
            return message("error", t(lg, "data.add.cannot_open"), [str(err)]), {}, gr.update(visible=False), "", None, "", ""
        report = inspect_source(source, fmt, mapping_of(state, fmt, values), max_records=CHECK_RECORDS,
                                preview=PREVIEW, sample=SAMPLE)
        pending = {"kind": report.kind, "valid": report.valid, "examples": report.examples, "sample": report.sample}
        n = len(report.examples)
        slider = gr.update(visible=n > 1, maximum=max(n, 2), value=1)
        fig, lengths = lengths_view(lg, pending, model, template, cutoff, ctx.policy)
        return (report_html(lg, report), pending, slider,
                preview_html(lg, pending, 1, model, template, cutoff, multiturn, ctx.policy),
                fig, lengths, report.kind)

    c["add_upload"].upload(load, [lang, c["add_upload"], gr.State(None)], load_outputs).then(
        check, check_inputs, check_outputs)
    for event in (c["add_load"].click, c["add_path"].submit):
        event(load, [lang, gr.State(None), c["add_path"]], load_outputs).then(check, check_inputs, check_outputs)
    c["add_check"].click(check, check_inputs, check_outputs)
    c["add_sample_by"].input(check, check_inputs, check_outputs)

    def on_format(lg, state, fmt):
        shown = fmt if fmt != "auto" else (state or {}).get("detected") or ""
        return [KIND_OF_FORMAT.get(shown, "")] + mapping_updates(lg, shown)

    c["add_format"].input(on_format, [lang, c["add_source"], c["add_format"]], [c["add_kind"]] + maps)
    preview_inputs = [lang, c["add_pending"], c["add_example_no"], f["model.path"], f["model.template"],
                      f["data.cutoff_len"], f["data.multiturn_loss"]]
    c["add_example_no"].change(lambda *a: preview_html(*a, policy=ctx.policy), preview_inputs, c["add_preview"],
                               show_progress="hidden")

    def save(lg, state, fmt, name, description, skip, stage, chosen, sample_by, *values):
        """Validate every record and register the dataset; it is then selected when the stage trains on its kind."""
        if not state:
            return message("warn", t(lg, "data.add.no_source")), gr.skip(), gr.skip()
        try:
            spec, report = add_dataset(_source(state, ctx.policy, sample_by), (name or "").strip(), ws_registry, fmt, mapping_of(state, fmt, values),
                                       description=description or "", copy=bool(state.get("upload")),
                                       skip_invalid=bool(skip))
        except (DataError, OSError) as err:
            return message("error", t(lg, "data.add.save_failed"), [str(err)]), gr.skip(), gr.skip()
        ctx.defaults.data.registry = str(ws_registry)
        choices, _ = dataset_choices(str(ws_registry), stage)
        fits = STAGE_KINDS.get(stage) in (None, spec.kind)
        value = list(dict.fromkeys([*(chosen or []), spec.name])) if fits else (chosen or [])
        key = "data.add.saved" if fits else "data.add.saved_other_kind"
        done = t(lg, key, name=spec.name, records=f"{report.valid:,}", fmt=spec.format, kind=spec.kind,
                 registry=ws_registry, stage=stage)
        lines = [t(lg, "data.add.skipped", n=f"{report.error_count:,}")] if report.error_count else []
        return (f'<div id="data-saved" data-name="{esc(spec.name)}">{message("ok", done, lines)}</div>',
                gr.update(choices=choices, value=value), str(ws_registry))

    c["add_save"].click(save, [lang, c["add_source"], c["add_format"], c["add_name"], c["add_desc"], c["add_skip"],
                               f["method.stage"], f["data.datasets"], c["add_sample_by"]] + maps,
                        [c["add_msg"], f["data.datasets"], f["data.registry"]])

    def use_workspace_registry(registry):
        """A page opened after datasets were added starts on the registry that holds them."""
        if ws_registry.is_file() and find_path(registry or "").resolve() == PROJECT_REGISTRY.resolve():
            return str(ws_registry)
        return gr.skip()

    ctx.on_load.append((use_workspace_registry, [f["data.registry"]], [f["data.registry"]]))
