"""Data tab: the stage, the datasets it accepts, and a preview (count + first examples as conversations);
below it, the "Add a dataset" panel (``data_add``)."""

from __future__ import annotations

import threading
from itertools import islice
from pathlib import Path

import gradio as gr

from engine.data import DataError, load_registry, normalize, read_records, resolve_dataset
from engine.run.paths import PathRefused, is_path_value
from engine.run.stages import STAGE_KINDS

from .. import form
from ..i18n import t
from ..views import esc, message
from . import data_add

PREVIEW_ROWS = 3
COUNT_CAP = 200_000
_counts: dict[tuple[str, float, int, str], int] = {}
_count_lock = threading.Lock()


def count_records(path: Path, sample_by: str = "line") -> int:
    """Records in a data file (streamed; cached per file version; capped at COUNT_CAP)."""
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size, sample_by)
    with _count_lock:
        if key not in _counts:
            _counts[key] = sum(1 for _ in islice(read_records(path, sample_by=sample_by), COUNT_CAP))
        return _counts[key]


def confined(policy, registry: str, names: list[str] = ()) -> str | None:
    """The policy's sentence for the registry or a dataset path outside the page's folders (None: all inside)."""
    if policy is None:
        return None
    try:
        policy.check(registry, "data.registry")
        for name in names:
            if is_path_value(name, "dataset"):
                policy.check(name, "data.datasets")
    except PathRefused as err:
        return f"{err.field}: {err}"
    return None


def dataset_choices(registry: str, stage: str, policy=None) -> tuple[list[tuple[str, str]], str | None]:
    """(label, name) of the registered datasets the stage can train on, and the registry's problem if any."""
    need = STAGE_KINDS.get(stage)
    refused = confined(policy, registry)
    if refused:
        return [], refused
    try:
        specs = load_registry(registry)
    except DataError as err:
        return [], str(err)
    return [(name, name) for name, s in specs.items() if need is None or s.kind == need], None


def mix_html(lang: str, names: list[str], counts: list[int], mix: str, probabilities: str, stopping: str,
             max_samples, seed) -> str:
    """The rows a run would take from each dataset (data.mix), or nothing while the mix settings are not valid."""
    from engine.data.loader import mix_counts
    from engine.run.config import DataConfig

    try:
        probs = [float(p) for p in str(probabilities or "").replace(";", ",").split(",") if p.strip()]
        cfg = DataConfig(datasets=names, mix=mix, mix_probabilities=probs, mix_stopping=stopping)
        if probs and (len(probs) != len(names) or abs(sum(probs) - 1) > 1e-6 or min(probs) < 0):
            return ""  # Start names the problem (engine.run.checks)
        cap = int(max_samples) if max_samples else None
        taken = mix_counts([min(n, cap) if cap else n for n in counts], cfg, int(seed or 0))
    except (ValueError, TypeError):
        return ""
    parts = ", ".join(f"{name} {n:,}" for name, n in zip(names, taken))
    return (f'<div class="wb-hint" id="data-mix" data-rows="{",".join(map(str, taken))}">'
            f'{esc(t(lang, "data.mix_rows", mix=mix, rows=parts, n=f"{sum(taken):,}"))}</div>')


def preview_html(lang: str, stage: str, names: list[str], registry: str, mix: str = "concat", probabilities: str = "",
                 stopping: str = "first_exhausted", max_samples=None, seed=0, policy=None) -> str:
    if not names:
        return message("warn", t(lang, "data.none_selected"))
    refused = confined(policy, registry, names)
    if refused:
        return message("error", t(lang, "data.cannot_read", name=", ".join(names)), [refused])
    need = STAGE_KINDS.get(stage)
    blocks = []
    total = 0
    counted: list[int] = []
    for name in names:
        try:
            spec = resolve_dataset(name, registry)
            count = count_records(spec.path, spec.sample_by)
        except (DataError, OSError) as err:
            blocks.append(message("error", t(lang, "data.cannot_read", name=name), [str(err)]))
            continue
        total += count
        counted.append(count)
        head = (f'<div class="wb-ds-head"><b>{esc(spec.name)}</b><span class="wb-chip">{esc(spec.kind)}</span>'
                f'<span class="wb-chip">{esc(spec.format)}</span><span class="wb-chip" data-count="{count}">'
                f'{esc(t(lang, "data.count", n=f"{count:,}"))}</span></div>'
                f'<div class="wb-hint">{esc(spec.description or spec.path)}</div>')
        if need and spec.kind != need:
            head += message("warn", t(lang, "data.wrong_kind", name=name, kind=spec.kind, stage=stage, need=need))
        examples = []
        try:
            for line, record in read_records(spec.path, PREVIEW_ROWS, sample_by=spec.sample_by):
                examples.append(_example(record, spec))
        except DataError as err:
            examples.append(message("error", t(lang, "data.bad_row"), [str(err)]))
        blocks.append(f'<div class="wb-card wb-ds">{head}{"".join(examples)}</div>')
    summary = f'<div class="wb-subtitle" id="data-total" data-total="{total}">{esc(t(lang, "data.total", n=f"{total:,}"))}</div>'
    if len(names) > 1 and len(counted) == len(names):
        summary += mix_html(lang, names, counted, mix, probabilities, stopping, max_samples, seed)
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
                choices, problem = dataset_choices(ctx.values["data.registry"], ctx.values["method.stage"], ctx.policy)
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
        choices, problem = dataset_choices(registry, stage, ctx.policy)
        names = {v for _, v in choices}
        keep = [d for d in (chosen or []) if d in names or Path(d).suffix]  # typed file paths stay
        msg = message("error", t(lg, "data.bad_registry"), [problem]) if problem else ""
        # the value is only set when something must go: an unchanged one may be older than the page's
        # (the Add panel's Save sets the registry and a new selection at once)
        return gr.update(choices=choices, **({"value": keep} if keep != list(chosen or []) else {})), msg

    for comp in (f["data.registry"], f["method.stage"]):
        comp.change(refresh_choices, [lang, f["data.registry"], f["method.stage"], f["data.datasets"]],
                    [f["data.datasets"], c["registry_msg"]], show_progress="hidden")
    mixing = [f["data.mix"], f["data.mix_probabilities"], f["data.mix_stopping"], f["data.max_samples"], f["training.seed"]]
    inputs = [lang, f["method.stage"], f["data.datasets"], f["data.registry"], *mixing]

    def preview(*args):
        return preview_html(*args, policy=ctx.policy)

    ctx.on_load.append((preview, inputs, c["data_preview"], [f["data.datasets"].change, *(w.change for w in mixing)]))
    ctx.on_lang.append((preview, inputs, c["data_preview"]))
    data_add.wire(ctx, dataset_choices)
