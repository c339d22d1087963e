"""Export tab: merge a checkpoint into its base as sharded safetensors (and GGUF), run as a job; shows the
verification (max logit difference vs. the adapter, the export's own answer; per GGUF file its size, logit
difference, top-1 agreement and answer), sizes and time."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import gradio as gr

from engine.run import jobs
from engine.run.jobconfig import ExportConfig, GGUFType

from ..i18n import t
from ..jobview import checkpoint_choices, info, job_choices, job_dir, problems_html, status_html
from ..views import esc

LABELS = {"ex_ckpt": "checkpoint", "ex_dir": "output_dir", "ex_overwrite": "overwrite", "ex_dtype": "dtype",
          "ex_shard": "max_shard_size", "ex_gguf": "gguf", "ex_prompt": "prompt", "ex_repo": "repo_id",
          "ex_token": "token", "ex_job": "job"}


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
                     f"{'✓' if g['tokens_match'] else '✗'} → <span class='ex-gguf-answer'>{esc(g['answer'])}</span>"))
    if result.get("hub"):
        rows.append(("hub", esc(result["hub"].get("url", ""))))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="wb-export-result" id="ex-result">{body}</table>'


def build(ctx) -> None:
    c = ctx.shared
    d = ExportConfig()
    with gr.Tab(ctx.t("export.tab"), id="export") as tab:
        ctx.translate(tab, label="export.tab")
        with gr.Row():
            c["ex_ckpt"] = gr.Dropdown([], value=None, label=ctx.t("export.checkpoint"), info=info("export", "model.checkpoint"),
                                       elem_id="ex-ckpt", scale=3)
            c["ex_dir"] = gr.Textbox("", label=ctx.t("export.output_dir"), info=info("export", "output.dir"), elem_id="ex-dir", scale=3)
            c["ex_overwrite"] = gr.Checkbox(d.output.overwrite, label=ctx.t("export.overwrite"), info=info("export", "output.overwrite"),
                                            elem_id="ex-overwrite")
        with gr.Row():
            c["ex_dtype"] = gr.Dropdown(["bfloat16", "float16", "float32"], value=d.output.dtype, label=ctx.t("export.dtype"),
                                        info=info("export", "output.dtype"), elem_id="ex-dtype")
            c["ex_shard"] = gr.Textbox(d.output.max_shard_size, label=ctx.t("export.max_shard_size"),
                                       info=info("export", "output.max_shard_size"), elem_id="ex-shard")
            c["ex_gguf"] = gr.CheckboxGroup(list(get_args(GGUFType)), value=d.output.gguf, label=ctx.t("export.gguf"),
                                            info=info("export", "output.gguf"), elem_id="ex-gguf")
            c["ex_prompt"] = gr.Textbox(d.verify.prompt, label=ctx.t("export.prompt"), info=info("export", "verify.prompt"))
        with gr.Accordion(ctx.t("export.hub"), open=False) as hub:
            with gr.Row():
                c["ex_repo"] = gr.Textbox("", label=ctx.t("export.repo_id"), info=info("export", "hub.repo_id"), elem_id="ex-repo")
                c["ex_token"] = gr.Textbox("", type="password", label=ctx.t("export.token"), info=info("export", "hub.token"))
        ctx.translate(hub, label="export.hub")
        with gr.Row(equal_height=True):
            c["ex_start"] = gr.Button(ctx.t("export.start"), variant="primary", elem_id="btn-export", scale=0, min_width=160)
            c["ex_job"] = gr.Dropdown([], value=None, label=ctx.t("export.job"), elem_id="ex-job", scale=3)
        c["ex_status"] = gr.HTML("", elem_id="ex-status")
        c["ex_result"] = gr.HTML("", elem_id="ex-result-box")
        c["ex_timer"] = gr.Timer(2.0)
        c["ex_tab"] = tab
    for key, loc in LABELS.items():
        ctx.translate(c[key], label=f"export.{loc}")
    ctx.translate(c["ex_start"], value="export.start")


def wire(ctx) -> None:
    c, lang, ws = ctx.shared, ctx.shared["lang"], ctx.workspace

    def start(lg, ckpt, out, overwrite, dtype, shard, gguf, prompt, repo, token):
        try:
            cfg = ExportConfig.model_validate({
                "model": {"checkpoint": ckpt or ""},
                "output": {"dir": str(Path(out).expanduser().resolve()) if out else "", "overwrite": overwrite, "dtype": dtype,
                           "max_shard_size": shard, "gguf": gguf or []},
                "verify": {"prompt": prompt}, "hub": {"repo_id": repo, "token": token},
            })
            path = ctx.manager.submit(cfg).run_dir  # through the device queue: waits while a run holds the device
        except Exception as err:  # noqa: BLE001 - shown on the page
            return problems_html(lg, err), gr.skip()
        return status_html(lg, path), gr.update(choices=job_choices("export", ws), value=path.name)

    c["ex_start"].click(start, [lang, c["ex_ckpt"], c["ex_dir"], c["ex_overwrite"], c["ex_dtype"], c["ex_shard"], c["ex_gguf"],
                                c["ex_prompt"], c["ex_repo"], c["ex_token"]], [c["ex_status"], c["ex_job"]])

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

    c["ex_tab"].select(refresh, None, [c["ex_ckpt"], c["ex_job"]])
    ctx.on_load.append((refresh, None, [c["ex_ckpt"], c["ex_job"]]))
