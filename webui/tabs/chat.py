"""Chat tab: talk to any checkpoint of any run (or a plain model), optionally side by side with a second one.

The model lives in a worker process (engine.serve.worker), never in this one: Load starts it, Unload
ends it and shows the memory that came back. Tokens stream from the worker into the Chatbot.

Side by side, the right column is any checkpoint, export or model, or the base of the left model. The line under
the picker says how the worker will serve it and what that costs (engine.serve.compare, from the files alone)
before Load right loads it; the same prompt, sampling and seed go to both columns, and Stop stops both.
Unticking Side by side drops the right side from the worker.
"""

from __future__ import annotations

import gradio as gr
import psutil

from engine.run.checkpoint import is_reward_model, weights_dirs
from engine.run.config import field_info
from engine.data.errors import DataError
from engine.data.tools import parse_tools
from engine.run.paths import PathRefused
from engine.serve.compare import BASE_OF_LEFT
from engine.serve.sampling import SamplingParams, parse_tool_calls
from engine.serve.worker import InferenceWorker, WorkerError

from .. import form
from ..i18n import t
from ..jobview import checkpoint_choices as workspace_choices
from ..modelinfo import ROOT, human_count, local_models
from ..runs import RunError
from ..views import esc, message
from .model import model_roots

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


def right_choices(ctx, lang: str) -> list[tuple[str, str]]:
    """The right side's picker: the base of the left model, every checkpoint and export of the workspace, the local models."""
    models = [(m, str(ROOT / m) if not m.startswith("/") else m) for m in local_models(model_roots(ctx))]
    seen: dict[str, tuple[str, str]] = {}
    for label, path in [(t(lang, "chat.base_of_left"), BASE_OF_LEFT)] + workspace_choices(ctx.workspace) + models:
        seen.setdefault(path, (label, path))
    return list(seen.values())


_DTYPE = {4: "float32", 2: "16-bit", 1.1: "8-bit", 0.56: "4-bit"}


def _right_path(choice: str | None, policy) -> str:
    """The right side as the worker takes it: BASE_OF_LEFT, or a path the page's policy allows (else PathRefused)."""
    choice = (choice or "").strip() or BASE_OF_LEFT
    return choice if choice == BASE_OF_LEFT else str(policy.check(choice))


def right_html(lang: str, worker: InferenceWorker, choice: str | None, policy, note: str = "") -> str:
    """The line under the right picker: what is loaded on the right, or how ``choice`` would be served and its cost."""
    def div(state: str, attrs: str, body: str) -> str:
        return f'<div id="chat-right-info" class="wb-hint" data-state="{state}"{attrs}>{body}{note}</div>'

    try:
        pick = _right_path(choice, policy)  # a path outside the page's folders is refused before anything reads it
        right = worker.right
        if right is not None and right.get("choice") == choice:
            return div("loaded", f' data-kind="{right["kind"]}"', esc(t(lang, "chat.right_loaded", name=right["name"])))
        if not worker.loaded:
            return div("empty", "", esc(t(lang, "chat.right_first")))
        plan = worker.plan(pick)
    except (PathRefused, WorkerError) as err:
        return div("error", "", message("error", t(lang, "chat.right_failed"), [str(err)]))
    words = dict(name=plan.name, size=_mb(plan.bytes), params=human_count(plan.params), per=f"{plan.per_param:g}",
                 dtype=_DTYPE.get(plan.per_param, ""))
    line = t(lang, f"chat.cost_{plan.kind}", **words) + " " + t(lang, "chat.press_right")
    return div("planned", f' data-kind="{plan.kind}" data-bytes="{plan.bytes}"', esc(line))


def load_right(lang: str, worker: InferenceWorker, choice: str | None, template: str | None, policy) -> tuple[str, list]:
    """Load ``choice`` on the right: (the picker's line, status lines: the memory it took, or why it failed)."""
    try:
        pick = _right_path(choice, policy)
        before = worker.rss()
        info = worker.compare(pick, template=template)
    except (PathRefused, WorkerError) as err:
        return right_html(lang, worker, choice, policy), [message("error", t(lang, "chat.right_failed"), [str(err)])]
    worker.right["choice"] = choice  # as the picker shows it (a typed path before the policy made it absolute)
    lines = [t(lang, "chat.mem_right", before=_mb(before), after=_mb(info["rss"]))] + info["warnings"]
    return right_html(lang, worker, choice, policy), [message("warn" if info["warnings"] else "ok", t(lang, "chat.right_ok"),
                                                              lines)]


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
            c["chat_tools"] = ctx.translate(gr.Code("", language="json", label=ctx.t("chat.tools"), lines=4,
                                                    elem_id="chat-tools"), label="chat.tools")
        with gr.Row(equal_height=True):
            c["chat_side"] = ctx.translate(gr.Checkbox(False, label=ctx.t("chat.side_by_side"), elem_id="chat-side", scale=1),
                                           label="chat.side_by_side")
            c["chat_right"] = ctx.translate(gr.Dropdown(right_choices(ctx, ctx.lang), value=BASE_OF_LEFT, allow_custom_value=True,
                                                        label=ctx.t("chat.right_pick"), info=ctx.t("chat.right_info"),
                                                        elem_id="chat-right", visible=False, scale=4),
                                            label="chat.right_pick", info="chat.right_info")
            c["chat_right_load"] = ctx.translate(gr.Button(ctx.t("chat.load_right"), elem_id="btn-chat-right-load", visible=False,
                                                           scale=1), value="chat.load_right")
        c["chat_right_info"] = gr.HTML(right_html(ctx.lang, c["chat_worker"], BASE_OF_LEFT, ctx.policy), visible=False,
                                       elem_id="chat-right-box")
        with gr.Row():
            c["chat_bot"] = ctx.translate(gr.Chatbot([], label=ctx.t("chat.left"), elem_id="chat-bot", height=420),
                                          label="chat.left")
            c["chat_right_bot"] = ctx.translate(gr.Chatbot([], label=ctx.t("chat.right"), visible=False, elem_id="chat-right-bot",
                                                           height=420), label="chat.right")
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

    def runs_update(run_id, right, lg):
        ids = [r.id for r in m.runs() if not is_reward_model(r.path)]  # a reward model scores, it cannot chat
        choices = right_choices(ctx, lg)
        return (gr.update(choices=[""] + ids, value=run_id if run_id in ids else None),
                gr.update(choices=choices, value=right or BASE_OF_LEFT))

    refresh = ([c["chat_run"], c["chat_right"], lang], [c["chat_run"], c["chat_right"]])
    c["chat_tab"].select(runs_update, *refresh, show_progress="hidden")
    ctx.on_load.append((runs_update, *refresh))

    def on_run(run_id):
        choices = checkpoint_choices(ctx, run_id)
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    c["chat_run"].change(on_run, c["chat_run"], c["chat_ckpt"], show_progress="hidden")

    def bot_labels(lg):
        """The columns' labels name what each side holds."""
        left = worker.info and "/".join((worker.info["adapters"] or [worker.info["base"]])[-1].split("/")[-2:])
        right = worker.right and worker.right["name"]
        return (gr.update(label=f"{t(lg, 'chat.left')}: {left}" if left else t(lg, "chat.left")),
                gr.update(label=f"{t(lg, 'chat.right')}: {right}" if right else t(lg, "chat.right")))

    # (registered before Load, whose inputs include the right picker too: a caller of the page's API that looks a
    # handler up by its inputs and outputs finds these first)
    def on_right(lg, right):
        return right_html(lg, worker, right, ctx.policy)

    c["chat_right"].change(on_right, [lang, c["chat_right"]], c["chat_right_info"], show_progress="hidden")

    def on_right_load(lg, right, template):
        line, notes = load_right(lg, worker, right, (template or "").strip() or None, ctx.policy)
        return line, status_html(lg, worker, "".join(notes)), bot_labels(lg)[1]

    c["chat_right_load"].click(on_right_load, [lang, c["chat_right"], c["chat_template"]],
                               [c["chat_right_info"], c["chat_status"], c["chat_right_bot"]], concurrency_limit=1)

    def on_load(lg, run_id, ckpt, model, quant, template, side, right):
        path = ckpt if run_id else (model or "").strip()
        if not path:
            return status_html(lg, worker, message("warn", t(lg, "chat.pick_first"))), gr.skip(), gr.skip(), gr.skip()
        try:
            ctx.policy.check(path)
        except PathRefused as err:
            return (status_html(lg, worker, message("error", t(lg, "chat.load_failed"), [str(err)])), gr.skip(), gr.skip(),
                    gr.skip())
        avail, rss = psutil.virtual_memory().available, worker.rss()
        template = (template or "").strip() or None
        try:
            info = worker.load(path, quantization=quant, template=template)
        except WorkerError as err:
            lines = [str(err)]
            busy = m.devices_queue.busy(jobs_only=True)
            if err.kind == "out_of_memory" and busy:
                lines.append(t(lg, "chat.training_busy", runs=", ".join(sorted(set(busy.values())))))
            return (status_html(lg, worker, message("error", t(lg, "chat.load_failed"), lines)),
                    right_html(lg, worker, right, ctx.policy), *bot_labels(lg))
        after = psutil.virtual_memory().available
        lines = [t(lg, "chat.mem_load", before=_mb(rss), after=_mb(info["rss"]), avail_before=_mb(avail),
                   avail_after=_mb(after))] + info["warnings"]
        note = message("warn" if info["warnings"] else "ok", t(lg, "chat.load_ok"), lines)
        info_line = right_html(lg, worker, right, ctx.policy)
        if side:  # side by side stays on: the right side comes back next to the new left one
            info_line, more = load_right(lg, worker, right, template, ctx.policy)
            note += "".join(more)
        return status_html(lg, worker, note), info_line, *bot_labels(lg)

    load_in = [lang, c["chat_run"], c["chat_ckpt"], c["chat_model"], c["chat_quant"], c["chat_template"], c["chat_side"],
               c["chat_right"]]
    load_out = [c["chat_status"], c["chat_right_info"], c["chat_bot"], c["chat_right_bot"]]
    c["chat_load"].click(on_load, load_in, load_out, concurrency_limit=1)

    def on_unload(lg, right):
        if not worker.alive:
            return status_html(lg, worker, message("info", t(lg, "chat.nothing_loaded"))), gr.skip(), gr.skip(), gr.skip()
        avail = psutil.virtual_memory().available
        freed = worker.unload()
        after = psutil.virtual_memory().available
        return (status_html(lg, worker, message("ok", t(lg, "chat.unloaded"), [
            t(lg, "chat.mem_unload", before=_mb(freed), avail_before=_mb(avail), avail_after=_mb(after))])),
            right_html(lg, worker, right, ctx.policy), *bot_labels(lg))

    c["chat_unload"].click(on_unload, [lang, c["chat_right"]], load_out, concurrency_limit=1)

    def on_side(lg, side, right):
        """Show or hide the right side; switching it off drops the right side from the worker."""
        shown = [gr.update(visible=side)] * 2
        if side or worker.right is None:
            return (*shown, gr.update(visible=side, value=right_html(lg, worker, right, ctx.policy)),
                    gr.update(visible=side), gr.skip())
        before = worker.rss()
        after = worker.uncompare()
        note = message("ok", t(lg, "chat.right_unloaded"),
                       [t(lg, "chat.mem_right", before=_mb(before), after=_mb(after["rss"] if after else worker.rss()))])
        return (*shown, gr.update(visible=False, value=right_html(lg, worker, right, ctx.policy)),
                gr.update(visible=False, label=t(lg, "chat.right")), status_html(lg, worker, note))

    c["chat_side"].change(on_side, [lang, c["chat_side"], c["chat_right"]],
                          [c["chat_right"], c["chat_right_load"], c["chat_right_info"], c["chat_right_bot"], c["chat_status"]],
                          show_progress="hidden")
    def on_send(lg, text, bot, right_bot, side, system, tools_text, as_tool, *values):
        text = (text or "").strip()
        if not text:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        try:
            tools = parse_tools((tools_text or "").strip() or None, "tools") or None
        except DataError as err:
            yield text, gr.skip(), gr.skip(), status_html(lg, worker, message("error", t(lg, "chat.failed"), [str(err)]))
            return
        if side and worker.loaded and worker.right is None:
            yield text, gr.skip(), gr.skip(), status_html(lg, worker, message("warn", t(lg, "chat.right_missing")))
            return
        params = SamplingParams(**dict(zip(SLIDERS, values)))
        side = side and worker.loaded
        histories = {"left": list(bot or []), "right": list(right_bot or [])}
        said = {"role": "user", "content": text}
        if as_tool:  # the result of the call the model just made, shown as such
            said["metadata"] = {"title": TOOL_RESULT}
        names = ["left", "right"] if side else ["left"]
        for n in names:
            histories[n] += [dict(said), {"role": "assistant", "content": ""}]
        right_out = lambda: histories["right"] if side else gr.skip()  # noqa: E731
        yield "", histories["left"], right_out(), gr.skip()
        convo = {n: ([{"role": "system", "content": system}] if system.strip() else []) +
                 [conversation_message(h, bool(tools)) for h in histories[n][:-1]] for n in names}  # each its own answers
        try:
            pieces = worker.compare_chat(convo, params, tools=tools) if side else \
                (("left", p) for p in worker.chat(convo["left"], params, tools=tools))
            for name, piece in pieces:
                histories[name][-1]["content"] += piece
                yield gr.skip(), histories["left"], right_out(), gr.skip()
        except WorkerError as err:
            for n in names:
                del histories[n][-2:]
            yield text, histories["left"], right_out(), status_html(lg, worker, message("error", t(lg, "chat.failed"), [str(err)]))
            return
        usage = [(n, worker.results.get(n)) for n in names]
        note = "".join(f'<div class="wb-hint" id="chat-usage{"-right" if n == "right" else ""}">'
                       f'{esc((t(lg, "chat." + n) + ": " if side else "") + t(lg, "chat.usage", **r.model_dump(exclude={"text"})))}'
                       f'</div>' for n, r in usage if r is not None)
        yield gr.skip(), gr.skip(), gr.skip(), status_html(lg, worker, note)

    send_in = [lang, c["chat_msg"], c["chat_bot"], c["chat_right_bot"], c["chat_side"], c["chat_system"], c["chat_tools"],
               c["chat_as_tool"], *[c[f"chat_{n}"] for n in SLIDERS]]
    send_out = [c["chat_msg"], c["chat_bot"], c["chat_right_bot"], c["chat_status"]]
    c["chat_send"].click(on_send, send_in, send_out, concurrency_limit=1, show_progress="hidden")
    c["chat_msg"].submit(on_send, send_in, send_out, concurrency_limit=1, show_progress="hidden")
    c["chat_stop"].click(lambda: worker.stop(), None, None, queue=False)  # side by side, both answers stop
    c["chat_clear"].click(lambda: ([], []), None, [c["chat_bot"], c["chat_right_bot"]], queue=False)
