"""Evaluate tab: the base model and checkpoints on the same evaluation (loss/perplexity, BLEU/ROUGE of generated
answers, multiple-choice accuracy), run as a job; results as one comparison table, a chart, and the predictions
with per-sample scores (sortable, so the worst ones can be read)."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from engine.run import jobs
from engine.run.jobconfig import EvalConfig

from ..i18n import t
from ..jobview import checkpoint_choices, info, job_choices, job_dir, problems_html, status_html

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("loss", "perplexity", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "accuracy")
LABELS = {"ev_base": "base", "ev_ckpts": "checkpoints", "ev_include_base": "include_base", "ev_tasks": "tasks",
          "ev_data": "datasets", "ev_max": "max_samples", "ev_batch": "batch_size", "ev_new": "max_new_tokens",
          "ev_sample": "do_sample", "ev_bench": "benchmark", "ev_job": "job", "ev_table": "comparison", "ev_chart": "chart",
          "ev_pred_model": "pred_model", "ev_preds": "predictions"}
PRED_COLS = ("index", "bleu-4", "rouge-l", "prompt", "reference", "prediction")


def _datasets() -> list[str]:
    from engine.data.registry import load_registry

    try:
        return [n for n, s in load_registry(ROOT / "data" / "dataset_info.yaml").items() if s.kind == "sft"]
    except Exception:  # noqa: BLE001 - the Data tab reports registry errors
        return []


def comparison(result: dict | None) -> pd.DataFrame:
    rows = (result or {}).get("rows", [])
    cols = [m for m in METRICS if any(m in r for r in rows)]
    return pd.DataFrame([[r["model"]] + [round(r[m], 4) if m in r else None for m in cols] for r in rows], columns=["model"] + cols)


def chart(result: dict | None) -> pd.DataFrame:
    rows = (result or {}).get("rows", [])
    return pd.DataFrame([{"model": r["model"], "metric": m, "value": r[m]} for r in rows
                         for m in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "accuracy") if m in r],
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
    d = EvalConfig()
    with gr.Tab(ctx.t("evaluate.tab"), id="evaluate") as tab:
        ctx.translate(tab, label="evaluate.tab")
        with gr.Row():
            c["ev_base"] = gr.Textbox(str(ROOT / d.model.base) if d.model.base else str(Path(ctx.defaults.model.path).resolve()),
                                      label=ctx.t("evaluate.base"), info=info("eval", "model.base"), elem_id="ev-base", scale=2)
            c["ev_ckpts"] = gr.Dropdown([], value=[], multiselect=True, label=ctx.t("evaluate.checkpoints"),
                                        info=info("eval", "model.checkpoints"), elem_id="ev-ckpts", scale=3)
            c["ev_include_base"] = gr.Checkbox(d.model.include_base, label=ctx.t("evaluate.include_base"), elem_id="ev-include-base")
        with gr.Row():
            c["ev_tasks"] = gr.CheckboxGroup([("loss / perplexity", "loss"), ("BLEU / ROUGE", "generation"), ("multiple choice", "choice")],
                                             value=["loss", "generation"], label=ctx.t("evaluate.tasks"), elem_id="ev-tasks")
            c["ev_data"] = gr.Dropdown(_datasets(), value=d.data.datasets, multiselect=True, label=ctx.t("evaluate.datasets"),
                                       info=info("eval", "data.datasets"), elem_id="ev-data")
            c["ev_max"] = gr.Number(d.data.max_samples, precision=0, minimum=1, label=ctx.t("evaluate.max_samples"),
                                    info=info("eval", "data.max_samples"), elem_id="ev-max")
        with gr.Row():
            c["ev_batch"] = gr.Number(d.generation.batch_size, precision=0, minimum=1, label=ctx.t("evaluate.batch_size"),
                                      info=info("eval", "generation.batch_size"))
            c["ev_new"] = gr.Number(d.generation.max_new_tokens, precision=0, minimum=1, label=ctx.t("evaluate.max_new_tokens"),
                                    info=info("eval", "generation.max_new_tokens"), elem_id="ev-new")
            c["ev_sample"] = gr.Checkbox(d.generation.do_sample, label=ctx.t("evaluate.do_sample"), info=info("eval", "generation.do_sample"))
            c["ev_bench"] = gr.Textbox(str(ROOT / d.benchmark.file), label=ctx.t("evaluate.benchmark"), info=info("eval", "benchmark.file"),
                                       elem_id="ev-bench")
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

    def start(lg, base, ckpts, include_base, tasks, data, max_samples, batch, new, sample, bench):
        try:
            cfg = EvalConfig.model_validate({
                "model": {"base": base, "checkpoints": ckpts or [], "include_base": include_base},
                "tasks": {k: k in (tasks or []) for k in ("loss", "generation", "choice")},
                "data": {"datasets": data or [], "registry": str(ROOT / "data" / "dataset_info.yaml"),
                         "max_samples": int(max_samples) if max_samples else None},
                "generation": {"batch_size": int(batch), "max_new_tokens": int(new), "do_sample": bool(sample)},
                "benchmark": {"file": bench},
            })
            path = ctx.manager.submit(cfg).run_dir  # through the device queue: waits while a run holds the device
        except Exception as err:  # noqa: BLE001 - shown on the page
            return problems_html(lg, err), gr.skip()
        return status_html(lg, path), gr.update(choices=job_choices("eval", ws), value=path.name)

    c["ev_start"].click(start, [lang, c["ev_base"], c["ev_ckpts"], c["ev_include_base"], c["ev_tasks"], c["ev_data"], c["ev_max"],
                                c["ev_batch"], c["ev_new"], c["ev_sample"], c["ev_bench"]], [c["ev_status"], c["ev_job"]])

    def show(lg, name, model):
        path = job_dir("eval", ws, name)
        result = jobs.read_result(path) if path else None
        models = [r["model"] for r in (result or {}).get("rows", []) if r["model"] in (result or {}).get("predictions", {})]
        model = model if model in models else (models[-1] if models else None)
        return (status_html(lg, path), comparison(result), chart(result), gr.update(choices=models, value=model),
                predictions(path, result, model))

    outs = [c["ev_status"], c["ev_table"], c["ev_chart"], c["ev_pred_model"], c["ev_preds"]]
    c["ev_job"].change(show, [lang, c["ev_job"], c["ev_pred_model"]], outs)
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
        return (gr.update(choices=checkpoint_choices(ws)), gr.update(choices=job_choices("eval", ws)))

    c["ev_tab"].select(refresh, None, [c["ev_ckpts"], c["ev_job"]])
    ctx.on_load.append((refresh, None, [c["ev_ckpts"], c["ev_job"]]))
