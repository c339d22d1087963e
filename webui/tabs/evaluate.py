"""Evaluate tab: the base model and checkpoints on the same evaluation (loss/perplexity, BLEU/ROUGE of generated
answers, multiple-choice accuracy, lm-evaluation-harness tasks), run as a job; results as one comparison table, a chart, and the predictions
with per-sample scores (sortable, so the worst ones can be read)."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from engine.data.registry import PROJECT_REGISTRY, ROOT, load_registry, workspace_registry
from engine.run import jobs
from engine.run.jobconfig import EvalConfig

from .. import form
from ..jobview import checkpoint_choices, job_choices, job_dir, problems_html, status_html

METRICS = ("loss", "perplexity", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "accuracy")
LABELS = {"ev_tasks": "tasks", "ev_job": "job", "ev_table": "comparison", "ev_chart": "chart",
          "ev_pred_model": "pred_model", "ev_preds": "predictions"}
PRED_COLS = ("index", "bleu-4", "rouge-l", "prompt", "reference", "prediction")
# The form's rows: field -> (locale key of its label, what the schema's type does not say). Bounds, defaults and
# help come from EvalConfig.
ROWS = (
    {"model.base": ("evaluate.base", {"elem_id": "ev-base", "scale": 2}),
     "model.checkpoints": ("evaluate.checkpoints", {"custom": False, "elem_id": "ev-ckpts", "scale": 3}),
     "model.include_base": ("evaluate.include_base", {"elem_id": "ev-include-base"})},
    {"data.datasets": ("evaluate.datasets", {"custom": False, "elem_id": "ev-data"}),
     "data.max_samples": ("evaluate.max_samples", {"elem_id": "ev-max"})},
    {"generation.batch_size": ("evaluate.batch_size", {"widget": "number"}),
     "generation.max_new_tokens": ("evaluate.max_new_tokens", {"elem_id": "ev-new"}),
     "generation.do_sample": ("evaluate.do_sample", {}),
     "benchmark.file": ("evaluate.benchmark", {"elem_id": "ev-bench"})},
    {"harness.tasks": ("evaluate.harness_tasks", {"elem_id": "ev-harness", "scale": 3}),
     "harness.num_fewshot": ("evaluate.num_fewshot", {}),
     "harness.limit": ("evaluate.limit", {})},
)
KEYS = [k for row in ROWS for k in row]
TASKS = ("loss", "generation", "choice", "harness")


def registry(workspace: Path) -> Path:
    """The registry the Evaluate tab lists: the workspace's (the Data tab's additions, which include the
    project's datasets) once it exists, else the project's."""
    ws = workspace_registry(workspace)
    return ws if ws.is_file() else PROJECT_REGISTRY


def datasets(workspace: Path) -> list[str]:
    """The SFT datasets of the registry: the last assistant turn is the reference."""
    try:
        return [n for n, s in load_registry(registry(workspace)).items() if s.kind == "sft"]
    except Exception:  # noqa: BLE001 - the Data tab reports registry errors
        return []


def _harness_columns(rows: list[dict]) -> list[str]:
    """The "<task> <metric>" columns of lm-evaluation-harness results, in the order they first appear."""
    return list(dict.fromkeys(f"{task} {metric}" for r in rows for task, metrics in (r.get("harness") or {}).items()
                              for metric in metrics if metric != "sample_len"))


def comparison(result: dict | None) -> pd.DataFrame:
    rows = (result or {}).get("rows", [])
    cols = [m for m in METRICS if any(m in r for r in rows)] + _harness_columns(rows)
    return pd.DataFrame([[r["model"]] + [round(r[m], 4) if m in r else None for m in cols] for r in rows], columns=["model"] + cols)


def chart(result: dict | None) -> pd.DataFrame | None:
    """The scores chart's table; None while there are no results, so the chart is built from the first rows it gets
    and takes its colours from their models (see curveview.staged)."""
    rows = (result or {}).get("rows", [])
    if not rows:
        return None
    shown = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "accuracy")
    return pd.DataFrame([{"model": r["model"], "metric": m, "value": r[m] * (100 if m not in shown else 1)} for r in rows
                         for m in shown + tuple(_harness_columns(rows)) if m in r],
                        columns=["model", "metric", "value"])


def predictions(path: Path | None, result: dict | None, model: str | None) -> pd.DataFrame:
    files = (result or {}).get("predictions", {})
    name = files.get(model) or next(iter(files.values()), None)
    if path is None or not name or not (path / name).is_file():
        return pd.DataFrame(columns=list(PRED_COLS))
    rows = [json.loads(line) for line in (path / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda r: r["rouge-l"])  # worst first
    return pd.DataFrame([[r["index"], round(r["bleu-4"], 2), round(r["rouge-l"], 2), r["prompt"], r["reference"], r["prediction"]]
                         for r in rows], columns=list(PRED_COLS))


def build(ctx) -> None:
    c = ctx.shared
    values = {"model.base": str(Path(ctx.defaults.model.path).resolve()),
              "benchmark.file": str(ROOT / EvalConfig().benchmark.file)}
    with gr.Tab(ctx.t("evaluate.tab"), id="evaluate") as tab:
        ctx.translate(tab, label="evaluate.tab")
        specs = {}
        for i, row in enumerate(ROWS):
            with gr.Row():
                if i == 1:
                    tasks = EvalConfig().tasks
                    c["ev_tasks"] = gr.CheckboxGroup([("loss / perplexity", "loss"), ("BLEU / ROUGE", "generation"),
                                                      ("multiple choice", "choice"), ("lm-evaluation-harness", "harness")],
                                                     value=[k for k in TASKS if getattr(tasks, k)],
                                                     label=ctx.t("evaluate.tasks"), elem_id="ev-tasks")
                specs |= form.build_schema_fields(ctx, EvalConfig, row, "ev:", values,
                                                  {"data.datasets": [(n, n) for n in datasets(ctx.workspace)]})
        c["ev_specs"] = specs
        with gr.Row(equal_height=True):
            c["ev_start"] = gr.Button(ctx.t("evaluate.start"), variant="primary", elem_id="btn-eval", scale=0, min_width=160)
            c["ev_job"] = gr.Dropdown([], value=None, label=ctx.t("evaluate.job"), elem_id="ev-job", scale=3)
        c["ev_status"] = gr.HTML("", elem_id="ev-status")
        c["ev_table"] = gr.Dataframe(value=comparison(None), label=ctx.t("evaluate.comparison"), interactive=False, elem_id="ev-table")
        c["ev_chart"] = gr.BarPlot(chart(None), x="metric", y="value", color="model", label=ctx.t("evaluate.chart"), elem_id="ev-chart")
        c["ev_pred_model"] = gr.Dropdown([], value=None, label=ctx.t("evaluate.pred_model"), elem_id="ev-pred-model")
        c["ev_preds"] = gr.Dataframe(value=predictions(None, None, None), label=ctx.t("evaluate.predictions"), interactive=False,
                                     wrap=True, max_height=420, elem_id="ev-preds", show_search="search")
        c["ev_timer"] = gr.Timer(2.0)
        c["ev_tab"] = tab
    for key, loc in LABELS.items():
        ctx.translate(c[key], label=f"evaluate.{loc}")
    ctx.translate(c["ev_start"], value="evaluate.start")


def wire(ctx) -> None:
    c, lang, ws = ctx.shared, ctx.shared["lang"], ctx.workspace

    def start(lg, tasks, *values):
        try:
            base = {"tasks": {k: k in (tasks or []) for k in TASKS}, "data": {"registry": str(registry(ws))}}
            cfg = form.config_of(EvalConfig, c["ev_specs"], dict(zip(KEYS, values)), base)
            ctx.confine(cfg)
            path = ctx.manager.submit(cfg).run_dir  # through the device queue: waits while a run holds the device
        except Exception as err:  # noqa: BLE001 - shown on the page
            return problems_html(lg, err), gr.skip()
        return status_html(lg, path), gr.update(choices=job_choices("eval", ws), value=path.name)

    c["ev_start"].click(start, [lang, c["ev_tasks"]] + [c["ev:" + k] for k in KEYS], [c["ev_status"], c["ev_job"]])

    def show(lg, name, model):
        path = job_dir("eval", ws, name)
        result = jobs.read_result(path) if path else None
        models = [r["model"] for r in (result or {}).get("rows", []) if r["model"] in (result or {}).get("predictions", {})]
        model = model if model in models else (models[-1] if models else None)
        return (status_html(lg, path), comparison(result), chart(result), gr.update(choices=models, value=model),
                predictions(path, result, model))

    outs = [c["ev_status"], c["ev_table"], c["ev_chart"], c["ev_pred_model"], c["ev_preds"]]
    # the chart is emptied first: Gradio's chart keeps the colour domain of the rows it was built with, so the models
    # of another job would be drawn without colour (see curveview.staged)
    c["ev_job"].change(lambda: None, None, c["ev_chart"], show_progress="hidden").then(
        show, [lang, c["ev_job"], c["ev_pred_model"]], outs)
    c["ev_pred_model"].change(lambda lg, n, m: show(lg, n, m)[-1], [lang, c["ev_job"], c["ev_pred_model"]], c["ev_preds"])

    def poll(lg, name, model, shown):
        path = job_dir("eval", ws, name)
        sig = (path and (path / "status.json").is_file() and (path / "status.json").stat().st_mtime_ns, name)
        if sig == shown:
            return (gr.skip(),) * 5 + (shown,)
        return (*show(lg, name, model), sig)

    c["ev_sig"] = gr.State(None)
    c["ev_timer"].tick(poll, [lang, c["ev_job"], c["ev_pred_model"], c["ev_sig"]], outs + [c["ev_sig"]], show_progress="hidden")

    def refresh():
        return (gr.update(choices=checkpoint_choices(ws)), gr.update(choices=job_choices("eval", ws)),
                gr.update(choices=[(n, n) for n in datasets(ws)]))

    outs = [c["ev:model.checkpoints"], c["ev_job"], c["ev:data.datasets"]]
    c["ev_tab"].select(refresh, None, outs)
    ctx.on_load.append((refresh, None, outs))
