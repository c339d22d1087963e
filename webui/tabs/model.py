"""Model tab: model directory, chat template (with mismatch warnings), finetuning type, quantization,
parameter count and a memory estimate per method."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from engine.data.templates import template_names
from engine.run.hardware import computes_in_16_bits
from engine.run.paths import PathRefused

from .. import chatfmt, form
from ..i18n import t
from ..modelinfo import ROOT, ModelPathError, estimate_memory, human_count, inspect_model, local_models, resolve_model_path
from ..views import esc, message
from .data import confined

METHODS = ("full", "freeze", "lora", "qlora")


def model_roots(ctx):
    return [ROOT / "models", ctx.workspace / "models"]


def model_choices(ctx) -> list[str]:
    """Local model directories, then the workspace's merged exports (newest first): the next stage of a
    PT -> SFT -> RM -> DPO chain starts from the previous stage's export."""
    from ..jobview import checkpoint_choices

    exports = [path for label, path in checkpoint_choices(ctx.workspace) if label.startswith("export: ")]
    return list(dict.fromkeys(local_models(model_roots(ctx)) + exports))


def info_html(lang: str, path_text: str, method: str, quant: str, batch, cutoff, rank, freeze, gc, gpu: bool,
              policy=None, memory_gb=0.0, precision: str = "auto") -> str:
    try:
        path = resolve_model_path(path_text, policy)
        info = inspect_model(path)
    except ModelPathError as err:
        return message("error", t(lang, "model.bad_path"), [str(err)])
    except (OSError, ValueError) as err:
        return message("error", t(lang, "model.bad_config"), [str(err)])
    facts = [
        ("model.arch", info.architecture), ("model.params", f"{human_count(info.params)} ({info.params or 0:,})"),
        ("model.layers", info.layers), ("model.hidden", info.hidden),
        ("model.heads", f"{info.heads} / {info.kv_heads} KV"), ("model.vocab", f"{info.vocab:,}"),
        ("model.context", f"{info.context:,}"),
        ("model.has_template", t(lang, "common.yes") if info.chat_template else t(lang, "common.no")),
    ]
    kv = "".join(f'<div class="wb-kv"><span>{esc(t(lang, k))}</span><b>{esc(v)}</b></div>' for k, v in facts)
    rows, half = [], computes_in_16_bits(precision or "auto", gpu)
    for m in METHODS:
        q = quant if m == "qlora" else "none"
        if m == "qlora" and q == "none":
            q = "nf4"
        try:
            est = estimate_memory(info, m, q, int(batch or 1), int(cutoff or 512), int(rank or 8), int(freeze or 1), gc, gpu,
                                  float(memory_gb or 0), half=half)
        except (TypeError, ValueError):
            continue
        cls = ' class="wb-current"' if m == method else ""
        rows.append(f"<tr{cls}><td>{esc(m)}</td><td>{est['weights']:.2f}</td><td>{est['states']:.2f}</td>"
                    f"<td>{est['activations']:.2f}</td><td><b>{est['total']:.1f}</b></td></tr>")
    head = "".join(f"<th>{esc(t(lang, k))}</th>" for k in ("model.m_method", "model.m_weights", "model.m_states",
                                                                 "model.m_acts", "model.m_total"))
    return (f'<div class="wb-card" id="model-info"><div class="wb-card-title">{esc(path.name)}</div>'
            f'<div class="wb-kvs">{kv}</div>'
            f'<div class="wb-subtitle">{esc(t(lang, "model.memory_title"))}</div>'
            f'<table class="wb-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'<div class="wb-hint">{esc(t(lang, "model.memory_note"))}</div></div>')


def template_html(lang: str, path_text: str, template: str, policy=None) -> str:
    try:
        path = resolve_model_path(path_text, policy)
    except ModelPathError:
        return ""
    found = chatfmt.advice(path, template)
    if not found:
        return ""
    kind, text = found
    if kind == "no_template":
        return message("warn", t(lang, "model.no_template"))
    return message("warn", t(lang, "model.mismatch"), [text])


def template_warning(lang: str, path_text: str, template: str, policy=None):
    html = template_html(lang, path_text, template, policy)
    return gr.update(value=html, visible=bool(html))


def vocab_html(lang: str, path_text: str, source: str, datasets: list[str], registry: str, policy=None):
    """What model.extend_vocab does: tokens added, vocabulary size, and tokens per character before and after
    on a sample of the chosen datasets (the numbers train.log reports when the run starts)."""
    from engine.run.config import DataConfig
    from engine.train.vocab import VocabError, preview, sample_text

    source = (source or "").strip()
    if not source:
        return gr.update(value="", visible=False)
    try:
        path = resolve_model_path(path_text, policy)
        where = Path(source).expanduser()
        where = where if where.is_absolute() else ROOT / where
        if policy is not None and not policy.allows(where):
            raise policy.refusal(source, "model.extend_vocab")
        if (refused := confined(policy, registry, datasets or [])):
            raise PathRefused(refused)
        text = sample_text(DataConfig(datasets=list(datasets or []), registry=registry)) if datasets else ""
        info = preview(path, where, text)
    except (ModelPathError, VocabError, OSError, ValueError) as err:
        return gr.update(value=message("error", t(lang, "model.vocab_bad"), [str(err)]), visible=True)
    lines = [t(lang, "model.vocab_counts", tokens=f"{info['tokens']:,}", added=f"{info['added']:,}",
               present=f"{info['present']:,}", before=f"{info['base_size']:,}", after=f"{info['size']:,}")]
    if info.get("sample_chars"):
        b, a = info["tokens_per_char_before"], info["tokens_per_char_after"]
        lines.append(t(lang, "model.vocab_gain", chars=f"{info['sample_chars']:,}", before=f"{b:.3f}", after=f"{a:.3f}",
                       change=f"{100 * (a - b) / b:+.0f}%" if b else "–"))
    else:
        lines.append(t(lang, "model.vocab_no_sample"))
    return gr.update(value=message("ok", t(lang, "model.vocab_title"), lines), visible=True)


def build(ctx) -> None:
    c = ctx.shared
    with gr.Tab(ctx.t("tabs.model"), id="model") as tab:
        ctx.translate(tab, label="tabs.model")
        with gr.Row():
            with gr.Column(scale=3):
                form.build(ctx, "model.path", choices=model_choices(ctx))
                form.build(ctx, "model.template", choices=template_names())
                c["template_warning"] = gr.HTML("", elem_id="template-warning", visible=False)
                form.build(ctx, "method.finetuning_type")
                form.build(ctx, "model.quantization")
                form.build_advanced(ctx, "model")
                c["vocab_box"] = gr.HTML("", elem_id="vocab-box", visible=False)
            with gr.Column(scale=2):
                c["model_info"] = gr.HTML("", elem_id="model-info-box")
        c["model_tab"] = tab


def wire(ctx) -> None:
    c, f, lang = ctx.shared, ctx.fields, ctx.shared["lang"]
    gpu = bool(ctx.manager.gpus)
    est_inputs = [lang, f["model.path"], f["method.finetuning_type"], f["model.quantization"],
                  f["training.per_device_train_batch_size"], f["data.cutoff_len"], f["method.lora_rank"],
                  f["method.freeze_trainable_layers"], f["training.gradient_checkpointing"], f["training.memory_gb"],
                  f["training.precision"]]

    def refresh_info(lg, path, method, quant, batch, cutoff, rank, freeze, gc, memory_gb, precision):
        return info_html(lg, path, method, quant, batch, cutoff, rank, freeze, gc, gpu, ctx.policy, memory_gb, precision)

    ctx.on_load.append((refresh_info, est_inputs, c["model_info"], [comp.change for comp in est_inputs[1:]]))
    ctx.on_lang.append((refresh_info, est_inputs, c["model_info"]))

    def on_path(lg, path, template):
        """A new model: suggest its template ('auto' when it has one) and check the pairing."""
        try:
            resolved = resolve_model_path(path, ctx.policy)
        except ModelPathError:
            return gr.skip(), gr.update(value="", visible=False)
        suggested = chatfmt.suggested(resolved)
        new = suggested if suggested and (template == "auto" or suggested == "auto") else template
        return new, template_warning(lg, path, new, ctx.policy)

    f["model.path"].input(on_path, [lang, f["model.path"], f["model.template"]],
                          [f["model.template"], c["template_warning"]])
    def warning(lg, path, template):
        return template_warning(lg, path, template, ctx.policy)

    ctx.on_load.append((warning, [lang, f["model.path"], f["model.template"]], c["template_warning"],
                        [f["model.template"].change]))
    ctx.on_lang.append((warning, [lang, f["model.path"], f["model.template"]], c["template_warning"]))

    def vocab(lg, path, source, datasets, registry):
        return vocab_html(lg, path, source, datasets, registry, ctx.policy)

    vocab_in = [lang, f["model.path"], f["model.extend_vocab"], f["data.datasets"], f["data.registry"]]
    for comp in vocab_in[1:3]:
        comp.change(vocab, vocab_in, c["vocab_box"], show_progress="minimal")
    ctx.on_lang.append((vocab, vocab_in, c["vocab_box"]))

    c["model_tab"].select(lambda: gr.update(choices=model_choices(ctx)), None, f["model.path"], show_progress="hidden")

    def on_method(method, quant):
        """QLoRA needs a quantized base, full and freeze tuning cannot have one."""
        if method == "qlora" and quant == "none":
            return "nf4"
        if method in ("full", "freeze") and quant != "none":
            return "none"
        return gr.skip()

    f["method.finetuning_type"].input(on_method, [f["method.finetuning_type"], f["model.quantization"]],
                                      f["model.quantization"])
