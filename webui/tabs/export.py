"""Export tab: merge a checkpoint into its base as sharded safetensors (and GGUF), run as a job; shows the
verification (max logit difference vs. the adapter, the export's own answer; per GGUF file its size, logit
difference, top-1 agreement, answer and the `ollama create` command of its Modelfile), sizes and time. Where
llama.cpp's tools (the [gguf] extra) are missing, a note under the GGUF choices names the command that installs
them, and the job's checks refuse a GGUF export before any work."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from engine.run import jobs
from engine.run.jobconfig import ExportConfig

from .. import form
from ..i18n import t
from ..jobview import checkpoint_choices, job_choices, job_dir, problems_html, status_html
from ..views import esc

# The form's rows: field -> (locale key of its label, what the schema's type does not say). Bounds, defaults and
# help come from ExportConfig.
ROWS = (
    {"model.checkpoint": ("export.checkpoint", {"widget": "dropdown", "elem_id": "ex-ckpt", "scale": 3}),
     "output.dir": ("export.output_dir", {"elem_id": "ex-dir", "scale": 3}),
     "output.overwrite": ("export.overwrite", {"elem_id": "ex-overwrite"})},
    {"output.dtype": ("export.dtype", {"widget": "dropdown", "elem_id": "ex-dtype"}),
     "output.max_shard_size": ("export.max_shard_size", {"elem_id": "ex-shard"}),
     "output.gguf": ("export.gguf", {"elem_id": "ex-gguf"}),
     "verify.prompt": ("export.prompt", {})},
)
HUB = {"hub.repo_id": ("export.repo_id", {"elem_id": "ex-repo"}), "hub.token": ("export.token", {"type": "password"})}
KEYS = [k for row in (*ROWS, HUB) for k in row]


def result_html(lang: str, result: dict | None) -> str:
    if not result:
        return ""
    v = result["verify"]
    rows = [(t(lang, "export.r_output"), f"<code>{esc(result['output_dir'])}</code>"),
            (t(lang, "export.r_size"), f"{result['safetensors_bytes'] / 1e6:.1f} MB, {result['shards']} shard(s), {esc(result['dtype'])}"),
            (t(lang, "export.r_time"), f"{result.get('seconds', 0):.1f} s"),
            (t(lang, "export.r_diff"), f"<span id='ex-diff'>{v['max_logit_diff']:.3g}</span> (≤ {v['tolerance']:g}; "
                                       f"{t(lang, 'export.r_delta')} {v['base_vs_adapter']:.3g})"),
            (t(lang, "export.r_answer"), f"<i>{esc(v['prompt'])}</i> → <span id='ex-answer'>{esc(v['answer'])}</span>")]
    for g in result.get("gguf", []):
        rows.append((f"GGUF {esc(g['type'])}",
                     f"<code>{esc(Path(g['path']).name)}</code> {g['bytes'] / 1e6:.1f} MB, {g['seconds']:.1f} s; "
                     f"{t(lang, 'export.r_gguf_diff')} <span class='ex-gguf-diff'>{g['max_logit_diff']:.3g}</span>, "
                     f"{t(lang, 'export.r_top1')} {g['top1_agreement']:.0%}, {t(lang, 'export.r_same')} "
                     f"{'✓' if g['tokens_match'] else '✗'} → <span class='ex-gguf-answer'>{esc(g['answer'])}</span>"
                     + (f"<br>{t(lang, 'export.r_ollama')} <code class='ex-ollama'>{esc(g['ollama']['command'])}</code>"
                        if g.get("ollama") else "")
                     + (f"<br><small class='ex-gguf-note'>{esc(g['tokenizer_note'])}</small>" if g.get("tokenizer_note") else "")))
    if result.get("hub"):
        rows.append(("hub", esc(result["hub"].get("url", ""))))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="wb-export-result" id="ex-result">{body}</table>'


def build(ctx) -> None:
    c = ctx.shared
    with gr.Tab(ctx.t("export.tab"), id="export") as tab:
        ctx.translate(tab, label="export.tab")
        specs = {}
        for row in ROWS:
            with gr.Row():
                specs |= form.build_schema_fields(ctx, ExportConfig, row, "ex:", {"model.checkpoint": None},
                                                  {"model.checkpoint": []})
        from engine.jobs.gguf import tools_problem  # torch-free

        missing = tools_problem()
        c["ex_gguf_note"] = gr.HTML(f"<div class='wb-note' id='ex-gguf-note'>{esc(missing)}</div>" if missing else "",
                                    elem_id="ex-gguf-note-box")
        with gr.Accordion(ctx.t("export.hub"), open=False) as hub:
            with gr.Row():
                specs |= form.build_schema_fields(ctx, ExportConfig, HUB, "ex:")
        ctx.translate(hub, label="export.hub")
        c["ex_specs"] = specs
        with gr.Row(equal_height=True):
            c["ex_start"] = gr.Button(ctx.t("export.start"), variant="primary", elem_id="btn-export", scale=0, min_width=160)
            c["ex_job"] = gr.Dropdown([], value=None, label=ctx.t("export.job"), elem_id="ex-job", scale=3)
        c["ex_status"] = gr.HTML("", elem_id="ex-status")
        c["ex_result"] = gr.HTML("", elem_id="ex-result-box")
        c["ex_timer"] = gr.Timer(2.0)
        c["ex_tab"] = tab
    ctx.translate(c["ex_job"], label="export.job")
    ctx.translate(c["ex_start"], value="export.start")


def wire(ctx) -> None:
    c, lang, ws = ctx.shared, ctx.shared["lang"], ctx.workspace

    def start(lg, *values):
        try:
            values = dict(zip(KEYS, values))
            values["model.checkpoint"] = values["model.checkpoint"] or ""
            out = (values["output.dir"] or "").strip()
            values["output.dir"] = str(Path(out).expanduser().resolve()) if out else ""
            cfg = form.config_of(ExportConfig, c["ex_specs"], values)
            ctx.confine(cfg)
            path = ctx.manager.submit(cfg).run_dir  # through the device queue: waits while a run holds the device
        except Exception as err:  # noqa: BLE001 - shown on the page
            return problems_html(lg, err), gr.skip()
        return status_html(lg, path), gr.update(choices=job_choices("export", ws), value=path.name)

    c["ex_start"].click(start, [lang] + [c["ex:" + k] for k in KEYS], [c["ex_status"], c["ex_job"]])

    def show(lg, name):
        path = job_dir("export", ws, name)
        return status_html(lg, path), result_html(lg, jobs.read_result(path) if path else None)

    c["ex_job"].change(show, [lang, c["ex_job"]], [c["ex_status"], c["ex_result"]])

    def poll(lg, name, shown):
        path = job_dir("export", ws, name)
        sig = (path and (path / "status.json").is_file() and (path / "status.json").stat().st_mtime_ns, name, lg)
        if sig == shown:
            return gr.skip(), gr.skip(), shown
        return (*show(lg, name), sig)

    c["ex_sig"] = gr.State(None)
    c["ex_timer"].tick(poll, [lang, c["ex_job"], c["ex_sig"]], [c["ex_status"], c["ex_result"], c["ex_sig"]], show_progress="hidden")

    def refresh():
        return gr.update(choices=checkpoint_choices(ws)), gr.update(choices=job_choices("export", ws))

    c["ex_tab"].select(refresh, None, [c["ex:model.checkpoint"], c["ex_job"]])
    ctx.on_load.append((refresh, None, [c["ex:model.checkpoint"], c["ex_job"]]))
