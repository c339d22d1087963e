"""Chat tab: talk to any checkpoint of any run (or a plain model), optionally next to its base model.

The model lives in a worker process (engine.serve.worker), never in this one: Load starts it, Unload
ends it and shows the memory that came back. Tokens stream from the worker into the Chatbot.
"""

from __future__ import annotations

import gradio as gr
import psutil

from engine.run.checkpoint import is_reward_model, weights_dirs
from engine.run.config import field_info
from engine.data.errors import DataError
from engine.data.tools import parse_tools
from engine.run.paths import PathRefused
from engine.serve.sampling import SamplingParams, parse_tool_calls
from engine.serve.worker import InferenceWorker, WorkerError

from .. import form
from ..i18n import t
from ..runs import RunError
from ..views import esc, message

# The sampling sliders from SamplingParams (bounds, defaults and help); here only what its types do not say:
# the slider steps, and ends narrower than the schema's limits for top_k and max_new_tokens.
SLIDERS = {
    "temperature": {"widget": "slider", "step": 0.05},
    "top_p": {"widget": "slider", "step": 0.01},
    "top_k": {"widget": "slider", "maximum": 200},
    "max_new_tokens": {"widget": "slider", "maximum": 4096},
    "repetition_penalty": {"widget": "slider", "step": 0.01},
}


def _mb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def checkpoint_choices(ctx, run_id: str | None) -> list[tuple[str, str]]:
    """(label, path) of a run's checkpoints, newest first, each with its step and the loss there; final/ on top."""
    if not run_id:
        return []
    try:
        run_dir = ctx.manager.run_dir(run_id)
    except RunError:
        return []
    series = ctx.manager.series(run_dir)
    out = []
    for step, path in weights_dirs(run_dir):
        if step is None:  # final/
            loss = series.last_loss()
            label = f"{path.name} · {loss:.4f}" if loss is not None else path.name
        else:
            loss = series.loss_at(step)
            label = f"{path.name} · step {step}" + (f" · loss {loss:.4f}" if loss is not None else "")
        out.append((label, str(path)))
    return out


def status_html(lang: str, worker: InferenceWorker, note: str = "") -> str:
    if worker.loaded:
        info = worker.info
        what = ", ".join(info["adapters"]) or info["base"]
        gpu = f" · GPU {_mb(info['gpu_allocated'])}" if "gpu_allocated" in info else ""
        head = t(lang, "chat.loaded", what=what, template=info["template"], rss=_mb(worker.rss())) + gpu
        return (f'<div id="chat-status" class="wb-card" data-state="loaded" data-rss="{worker.rss()}">{esc(head)}'
                f'{note}</div>')
    return f'<div id="chat-status" class="wb-card" data-state="empty">{esc(t(lang, "chat.none"))}{note}</div>'


TOOL_RESULT = "tool result"


def conversation_message(h: dict, tools: bool) -> dict:
    """A Chatbot message as the model sees it: a message marked as a tool result is a tool message, and with
    tools an answer that wrote calls in the template's tool format carries them as tool_calls."""
    if h["role"] == "user" and ((h.get("metadata") or {}).get("title") == TOOL_RESULT):
        return {"role": "tool", "content": h["content"]}
    if h["role"] == "assistant" and tools:
        text, calls = parse_tool_calls(h["content"])
        if calls:
            return {"role": "assistant", "content": text,
                    "tool_calls": [{"type": "function", "function": c} for c in calls]}
    return {"role": h["role"], "content": h["content"]}


def build(ctx) -> None:
    c = ctx.shared
    c["chat_worker"] = InferenceWorker(ctx.workspace)
    with gr.Tab(ctx.t("chat.tab"), id="chat") as tab:
        ctx.translate(tab, label="chat.tab")
        with gr.Row(equal_height=True):
            c["chat_run"] = ctx.translate(gr.Dropdown([], value=None, label=ctx.t("chat.run"), elem_id="chat-run", scale=3,
                                                      info=ctx.t("chat.run_info")), label="chat.run", info="chat.run_info")
            c["chat_ckpt"] = ctx.translate(gr.Dropdown([], value=None, label=ctx.t("chat.checkpoint"), elem_id="chat-ckpt",
                                                       scale=3), label="chat.checkpoint")
            c["chat_model"] = ctx.translate(gr.Textbox(ctx.defaults.model.path, label=ctx.t("chat.model"), scale=3,
                                                       elem_id="chat-model"), label="chat.model")
        with gr.Row(equal_height=True):
            c["chat_quant"] = ctx.translate(gr.Dropdown(list(form.spec("model.quantization").choices), value="none", elem_id="chat-quant", scale=1,
                                                        label=ctx.t("chat.quantization"),
                                                        info=field_info("model", "quantization").description),
                                            label="chat.quantization")
            c["chat_template"] = ctx.translate(gr.Textbox("", label=ctx.t("chat.template"), placeholder=ctx.t("chat.template_hint"),
                                                          elem_id="chat-template", scale=1), label="chat.template")
            c["chat_load"] = ctx.translate(gr.Button(ctx.t("chat.load"), variant="primary", elem_id="btn-chat-load", scale=1),
                                           value="chat.load")
            c["chat_unload"] = ctx.translate(gr.Button(ctx.t("chat.unload"), elem_id="btn-chat-unload", scale=1), value="chat.unload")
        c["chat_status"] = gr.HTML(status_html(ctx.lang, c["chat_worker"]), elem_id="chat-status-box")
        with gr.Accordion(ctx.t("chat.settings"), open=False) as acc:
            ctx.translate(acc, label="chat.settings")
            c["chat_system"] = ctx.translate(gr.Textbox("", label=ctx.t("chat.system"), lines=2, elem_id="chat-system"),
                                             label="chat.system")
            with gr.Row():
                for name, over in SLIDERS.items():
                    s = form.derive(SamplingParams, name, over)
                    c[f"chat_{name}"] = form.widget(s, s.default, label=name, info=form.schema_field(SamplingParams, name).description,
                                                    elem_id=f"chat-{name.replace('_', '-')}")
            c["chat_side"] = ctx.translate(gr.Checkbox(False, label=ctx.t("chat.side_by_side"), elem_id="chat-side"),
                                           label="chat.side_by_side")
            c["chat_tools"] = ctx.translate(gr.Code("", language="json", label=ctx.t("chat.tools"), lines=4,
                                                    elem_id="chat-tools"), label="chat.tools")
        with gr.Row():
            c["chat_base_bot"] = ctx.translate(gr.Chatbot([], label=ctx.t("chat.base"), visible=False, elem_id="chat-base-bot",
                                                          height=420), label="chat.base")
            c["chat_bot"] = ctx.translate(gr.Chatbot([], label=ctx.t("chat.tuned"), elem_id="chat-bot", height=420),
                                          label="chat.tuned")
        with gr.Row(equal_height=True):
            c["chat_msg"] = ctx.translate(gr.Textbox("", placeholder=ctx.t("chat.placeholder"), show_label=False, scale=6,
                                                     elem_id="chat-msg"), placeholder="chat.placeholder")
            c["chat_send"] = ctx.translate(gr.Button(ctx.t("chat.send"), variant="primary", scale=1, elem_id="btn-chat-send"),
                                           value="chat.send")
            c["chat_stop"] = ctx.translate(gr.Button(ctx.t("chat.stop"), variant="stop", scale=1, elem_id="btn-chat-stop"),
                                           value="chat.stop")
            c["chat_clear"] = ctx.translate(gr.Button(ctx.t("chat.clear"), scale=1, elem_id="btn-chat-clear"), value="chat.clear")
        c["chat_as_tool"] = ctx.translate(gr.Checkbox(False, label=ctx.t("chat.as_tool"), elem_id="chat-as-tool"),
                                          label="chat.as_tool")
        c["chat_tab"] = tab


def wire(ctx) -> None:
    c, m, lang, worker = ctx.shared, ctx.manager, ctx.shared["lang"], ctx.shared["chat_worker"]

    def runs_update(run_id):
        ids = [r.id for r in m.runs() if not is_reward_model(r.path)]  # a reward model scores, it cannot chat
        return gr.update(choices=[""] + ids, value=run_id if run_id in ids else None)

    c["chat_tab"].select(runs_update, c["chat_run"], c["chat_run"], show_progress="hidden")
    ctx.on_load.append((runs_update, c["chat_run"], c["chat_run"]))

    def on_run(run_id):
        choices = checkpoint_choices(ctx, run_id)
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    c["chat_run"].change(on_run, c["chat_run"], c["chat_ckpt"], show_progress="hidden")

    def on_load(lg, run_id, ckpt, model, quant, template):
        path = ckpt if run_id else (model or "").strip()
        if not path:
            return status_html(lg, worker, message("warn", t(lg, "chat.pick_first")))
        try:
            ctx.policy.check(path)
        except PathRefused as err:
            return status_html(lg, worker, message("error", t(lg, "chat.load_failed"), [str(err)]))
        avail, rss = psutil.virtual_memory().available, worker.rss()
        try:
            info = worker.load(path, quantization=quant, template=(template or "").strip() or None)
        except WorkerError as err:
            lines = [str(err)]
            busy = m.devices_queue.busy(jobs_only=True)
            if err.kind == "out_of_memory" and busy:
                lines.append(t(lg, "chat.training_busy", runs=", ".join(sorted(set(busy.values())))))
            return status_html(lg, worker, message("error", t(lg, "chat.load_failed"), lines))
        after = psutil.virtual_memory().available
        lines = [t(lg, "chat.mem_load", before=_mb(rss), after=_mb(info["rss"]), avail_before=_mb(avail),
                   avail_after=_mb(after))] + info["warnings"]
        return status_html(lg, worker, message("warn" if info["warnings"] else "ok", t(lg, "chat.load_ok"), lines))

    load_in = [lang, c["chat_run"], c["chat_ckpt"], c["chat_model"], c["chat_quant"], c["chat_template"]]
    c["chat_load"].click(on_load, load_in, c["chat_status"], concurrency_limit=1)

    def on_unload(lg):
        if not worker.alive:
            return status_html(lg, worker, message("info", t(lg, "chat.nothing_loaded")))
        avail = psutil.virtual_memory().available
        freed = worker.unload()
        after = psutil.virtual_memory().available
        return status_html(lg, worker, message("ok", t(lg, "chat.unloaded"), [
            t(lg, "chat.mem_unload", before=_mb(freed), avail_before=_mb(avail), avail_after=_mb(after))]))

    c["chat_unload"].click(on_unload, lang, c["chat_status"], concurrency_limit=1)

    def on_send(lg, text, bot, base_bot, side, system, tools_text, as_tool, *values):
        text = (text or "").strip()
        if not text:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        try:
            tools = parse_tools((tools_text or "").strip() or None, "tools") or None
        except DataError as err:
            yield text, gr.skip(), gr.skip(), status_html(lg, worker, message("error", t(lg, "chat.failed"), [str(err)]))
            return
        params = SamplingParams(**dict(zip(SLIDERS, values)))
        side = side and worker.loaded and bool(worker.info["adapters"])
        bots = [("tuned", list(bot or []), True)] + ([("base", list(base_bot or []), False)] if side else [])
        said = {"role": "user", "content": text}
        if as_tool:  # the result of the call the model just made, shown as such
            said["metadata"] = {"title": TOOL_RESULT}
        for _, history, _ in bots:
            history += [dict(said), {"role": "assistant", "content": ""}]
        yield "", bots[0][1], bots[1][1] if side else gr.skip(), gr.skip()
        for i, (_, history, use_adapter) in enumerate(bots):
            convo = ([{"role": "system", "content": system}] if system.strip() else []) + \
                [conversation_message(h, bool(tools)) for h in history[:-1]]
            try:
                for piece in worker.chat(convo, params, use_adapter=use_adapter, tools=tools):
                    history[-1]["content"] += piece
                    yield gr.skip(), bots[0][1], bots[1][1] if side else gr.skip(), gr.skip()
            except WorkerError as err:
                del history[-2:]
                yield text, bots[0][1], bots[1][1] if side else gr.skip(), status_html(
                    lg, worker, message("error", t(lg, "chat.failed"), [str(err)]))
                return
        last = worker.last
        note = "" if last is None else f'<div class="wb-hint" id="chat-usage">{esc(t(lg, "chat.usage", **last.model_dump(exclude={"text"})))}</div>'
        yield gr.skip(), gr.skip(), gr.skip(), status_html(lg, worker, note)

    send_in = [lang, c["chat_msg"], c["chat_bot"], c["chat_base_bot"], c["chat_side"], c["chat_system"], c["chat_tools"],
               c["chat_as_tool"], *[c[f"chat_{n}"] for n in SLIDERS]]
    send_out = [c["chat_msg"], c["chat_bot"], c["chat_base_bot"], c["chat_status"]]
    c["chat_send"].click(on_send, send_in, send_out, concurrency_limit=1, show_progress="hidden")
    c["chat_msg"].submit(on_send, send_in, send_out, concurrency_limit=1, show_progress="hidden")
    c["chat_stop"].click(lambda: worker.stop(), None, None, queue=False)
    c["chat_clear"].click(lambda: ([], []), None, [c["chat_bot"], c["chat_base_bot"]], queue=False)
    c["chat_side"].change(lambda s: gr.update(visible=s), c["chat_side"], c["chat_base_bot"], show_progress="hidden")
