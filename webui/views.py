"""HTML fragments of the page (status card, messages, conversations), built from plain data. No gradio."""

from __future__ import annotations

import html
import json
import time
from datetime import datetime

from .i18n import t
from .metrics import MetricSeries
from .runs import RunInfo

BADGE = {"queued": "gray", "starting": "blue", "running": "green", "stopping": "amber",
         "completed": "teal", "failed": "red", "stopped": "slate"}


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "–"


def memory(mb: float | None) -> str:
    if not mb:
        return "–"
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def memory_cell(latest: dict, devices: list[str] | tuple[str, ...] = ()) -> str:
    """The card's memory: per GPU 'peak allocated / reserved' when the run reports GPU memory, else one number (RSS)."""
    allocated, reserved = latest.get("gpu_allocated_mb"), latest.get("gpu_reserved_mb")
    if not isinstance(allocated, list) or not allocated:
        return memory(latest.get("memory_mb"))
    reserved = reserved if isinstance(reserved, list) and len(reserved) == len(allocated) else [None] * len(allocated)
    ids = list(devices) if len(devices) == len(allocated) else range(len(allocated))
    names = [f"GPU {i}" for i in ids]
    return " · ".join(f"{name}: {memory(a)}" + (f" / {memory(r)}" if r else "")
                      for name, a, r in zip(names, allocated, reserved))


def badge(lang: str, state: str) -> str:
    return f'<span class="wb-badge wb-{BADGE.get(state, "gray")}" data-state="{esc(state)}">{esc(t(lang, "state." + state))}</span>'


def message(kind: str, title: str, lines: list[str] | None = None) -> str:
    """A message box: kind is ok | info | warn | error."""
    items = "".join(f"<li>{esc(line)}</li>" for line in (lines or []))
    body = f"<ul>{items}</ul>" if items else ""
    return f'<div class="wb-msg wb-msg-{kind}" role="status"><b>{esc(title)}</b>{body}</div>'


def batch_words(lang: str, batch: tuple[str, int] | None) -> str:
    """What fills a training batch, in the page's language: "4 examples", "≤ 2,048 tokens"."""
    if batch is None:
        return "–"
    kind, n = batch
    key = "train.batch_tokens" if kind == "tokens" else "train.batch_example" if n == 1 else "train.batch_examples"
    return t(lang, key, n=f"{n:,}")


def run_card(lang: str, info: RunInfo | None, series: MetricSeries | None, now: float | None = None) -> str:
    """The Train tab's status card: state, progress bar, numbers. Data attributes let tests read it."""
    if info is None:
        return f'<div id="run-card" class="wb-card wb-empty" data-state="none" data-points="0">{esc(t(lang, "train.no_run"))}</div>'
    now = now or time.time()
    latest = series.latest if series else {}
    step, total = info.step, info.total_steps
    pct = min(100.0, 100.0 * step / total) if total else 0.0
    active = info.state in ("starting", "running", "stopping")
    elapsed = ((info.ended_at if not active and info.ended_at else now) - info.started_at) if info.started_at else None
    eta = None
    if info.state == "running" and latest.get("eta_s") is not None:
        eta = max(0.0, float(latest["eta_s"]) - (now - float(latest.get("time", now))))
    loss = info.last_loss
    stats = [
        ("train.step", f"{step:,} / {total:,}" if total else f"{step:,}"),
        ("train.elapsed", duration(elapsed)),
        ("train.eta", duration(eta) if eta is not None else "–"),
        ("train.loss", f"{loss:.4f}" if loss is not None else "–"),
        ("train.tokens_per_s", f"{latest['tokens_per_s']:,.0f}" if latest.get("tokens_per_s") else "–"),
        ("train.memory", memory_cell(latest, info.devices)),
        ("train.epoch", f"{latest['epoch']:.2f}" if isinstance(latest.get("epoch"), (int, float)) else "–"),
        ("train.points", f"{series.points if series else 0}"),
        ("train.batch", batch_words(lang, info.batch)),
    ]
    cells = "".join(f'<div class="wb-stat"><span>{esc(t(lang, k))}</span><b data-k="{k.split(".")[1]}">{esc(v)}</b></div>'
                    for k, v in stats)
    note = ""
    if info.state == "queued":
        note = message("info", t(lang, "train.queued_note", position=info.queue_position or "?",
                                 devices=", ".join(info.devices)))
    elif info.state == "failed":
        kind = t(lang, f"error_kind.{info.error_kind}") if info.error_kind else ""
        note = message("error", t(lang, "train.failed", kind=kind).strip(), [info.error or t(lang, "train.no_error")])
    elif info.state == "starting":
        note = f'<div class="wb-hint">{esc(t(lang, "train.starting_note"))}</div>'
    if info.warnings:
        note += message("warn", t(lang, "train.warnings"), list(info.warnings))
    bar_class = "wb-bar-fill" + (" wb-live" if active else "")
    where = t(lang, "train.world", n=info.world_size, nodes=", ".join(info.nodes)) if info.nodes else ", ".join(info.devices)
    return (
        f'<div id="run-card" class="wb-card" data-run="{esc(info.id)}" data-state="{esc(info.state)}" '
        f'data-step="{step}" data-total="{total}" data-points="{series.points if series else 0}">'
        f'<div class="wb-card-head"><div class="wb-run-id">{esc(info.id)}</div>{badge(lang, info.state)}'
        f'<div class="wb-run-meta">{esc(info.model)} · {esc(", ".join(info.datasets))} · {esc(info.method)} · '
        f'{esc(where)}</div></div>'
        f'<div class="wb-bar" title="{pct:.1f}%"><div class="{bar_class}" style="width:{pct:.2f}%"></div>'
        f'<span class="wb-bar-text">{pct:.0f}%</span></div>'
        f'<div class="wb-stats">{cells}</div>{note}</div>'
    )


def conversation(messages: list[dict], extra: list[tuple[str, str]] | None = None) -> str:
    """Chat bubbles for one example; ``extra`` adds labelled answers (chosen / rejected / completion)."""
    parts = []
    for m in messages:
        role = m.get("role", "user")
        calls = [c.get("function", c) for c in m.get("tool_calls") or ()]
        text = "\n".join([m.get("content") or ""] * bool(m.get("content")) +
                         [f"→ {c['name']}({json.dumps(c.get('arguments', {}), ensure_ascii=False)})" for c in calls])
        parts.append(f'<div class="wb-msg-row wb-{esc(role)}"><span class="wb-role">{esc(role)}</span>'
                     f'<div class="wb-bubble">{esc(text)}</div></div>')
    for label, text in extra or []:
        parts.append(f'<div class="wb-msg-row wb-assistant"><span class="wb-role">{esc(label)}</span>'
                     f'<div class="wb-bubble">{esc(text)}</div></div>')
    return f'<div class="wb-convo">{"".join(parts)}</div>'


def log_html(text: str) -> str:
    """The log tail in a box that stays scrolled to its end (column-reverse), unless the reader scrolls up."""
    return f'<div class="wb-log" id="train-log"><pre>{esc(text) or "&nbsp;"}</pre></div>'
