"""Click Start → first loss in the page, as a user sees it: ours (`workbench webui`) and, with ``--lf-venv``,
LlamaBoard (`llamafactory-cli webui`), each in a real Chromium, alternately.

    .venv/bin/python bench/first_loss.py [--runs 3] [--root OTHER_CHECKOUT] [--lf-venv /tmp/lfvenv] [--lf-logging-steps 1]

Ours: a fresh workspace, the page's defaults (the default model, the identity data, LoRA), Start; the clock
stops when the run card's loss cell first shows a number. ``--root`` also times another checkout (an earlier
revision, with ``models/`` in it), alternating with this one. LlamaBoard: a fresh working directory whose
``data/dataset_info.json`` names the same identity file; the page's model name SmolLM2-135M-Instruct with its
path set to the same local folder (its template follows: smollm2), LoRA (its default), the dataset ``identity``,
compute type fp32 (its default, bf16, stops at once on a machine without CUDA), Start; the clock stops when its
log box first shows ``'loss':`` (its loss plot is drawn in the same tick). Every other setting is each page's own
default: LlamaBoard logs every 5th optimizer step of 2 × 8 examples, we log every step of 4 examples, so its first
shown loss comes after 80 examples and ours after 4. ``--lf-logging-steps 1`` sets its logging slider to 1 (a
user's change), so that its first *step's* loss is shown.

One JSON line per run: ``first_shown_s`` (click → the first loss visible: what the table compares),
``shown_step`` (the step whose loss that was), ``first_step_loss_s`` (click → the first step's loss: ours from
metrics.jsonl's ``time``, which the page then shows within one poll; LlamaBoard's when its first shown row is step
1, else null: its log has no earlier row), and for ours train.log's start-up breakdown, ``click_to_rank_start_s``
(the launcher chain: click → the rank process's start) and ``server_cpu_s`` (the web server's own CPU seconds
between the click and the loss shown: Start's handler and the polls). Before each click the bench waits for the
server to go quiet (what opening the page started has finished), as a user reads the page before clicking. Each
run is stopped once its loss is shown.
Prints the load average before and after, then a table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
IDENTITY = ROOT / "data" / "identity.json"
LF_BF16_CPU = '{"optim": "adamw_torch", "use_cpu": true}'  # its box's default plus use_cpu
POLL_MS = 100  # how often the browser checks the page for the loss (well under either page's own refresh)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A web server in its own process session, up once its page answers 200."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict, log: Path, port: int):
        self.cmd, self.cwd, self.env, self.log, self.port = cmd, cwd, env, log, port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        import urllib.request

        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.cmd[0]} exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if urllib.request.urlopen(self.url, timeout=2).status == 200:
                    return self
            except OSError:
                time.sleep(0.3)
        raise SystemExit(f"{self.cmd[0]} did not answer within 180 s:\n{self.log.read_text()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def kill_tree_groups(root_dir: Path) -> None:
    """SIGKILL the process groups of runs started under ``root_dir`` (ours: status.json's pgid; LlamaBoard's
    trainer runs in the server's own group and dies with it)."""
    for status in root_dir.glob("runs/*/status.json"):
        try:
            pgid = json.loads(status.read_text()).get("pgid")
            if pgid:
                os.killpg(pgid, signal.SIGKILL)
        except (OSError, ValueError, ProcessLookupError, PermissionError):
            pass


def settle(pid: int, timeout_s: float = 120) -> None:
    """Wait until the server has finished what opening the page started (ours loads the model's tokenizer to check
    its template), as a user reads the page before clicking: under 0.05 CPU seconds in half a second, twice."""
    proc, quiet, deadline = psutil.Process(pid), 0, time.time() + timeout_s
    while quiet < 2 and time.time() < deadline:
        before = sum(proc.cpu_times()[:2])
        time.sleep(0.5)
        quiet = quiet + 1 if sum(proc.cpu_times()[:2]) - before < 0.05 else 0


def wait_text(page, js: str, timeout_s: float):
    """Poll the page every POLL_MS for ``js`` (an arrow function returning a value or null); returns its value."""
    return page.wait_for_function(js, polling=POLL_MS, timeout=timeout_s * 1000).json_value()


STARTUP = re.compile(r"start-up: (.*?) \((\d+\.\d+) s from process start")


def ours_once(browser, work: Path, timeout_s: float, root: Path = ROOT) -> dict:
    ws = work / "ws"
    env = dict(os.environ, PYTHONPATH=str(root), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    port = free_port()
    cmd = [sys.executable, "-m", "engine.cli", "webui", "--port", str(port), "--workspace", str(ws)]
    try:
        with Server(cmd, root, env, work / "server.log", port) as server:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(server.url)
            page.get_by_role("tab", name="Data").click()
            page.locator("#data-total[data-total='90']").wait_for()  # the defaults: identity, preselected
            page.get_by_role("tab", name="Train").click()
            page.locator("#btn-start").wait_for()
            settle(server.proc.pid)
            server_cpu = psutil.Process(server.proc.pid).cpu_times()
            t_click = time.time()
            page.locator("#btn-start").click()
            shown = wait_text(page, """() => { const b = document.querySelector('#run-card b[data-k=loss]');
                const card = document.querySelector('#run-card');
                if (card && card.dataset.state === 'failed') return 'failed: ' + card.innerText;
                return b && /\\d/.test(b.textContent) ? [b.textContent, card.dataset.step] : null }""", timeout_s)
            t_shown = time.time() - t_click
            cpu = psutil.Process(server.proc.pid).cpu_times()
            if isinstance(shown, str):
                raise SystemExit(f"ours: the run {shown}")
            page.close()
            run = next((ws / "runs").iterdir())
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            first = next(r for r in rows if "loss" in r)
            log = (run / "train.log").read_text(errors="replace")
            m = STARTUP.search(log)
            status = json.loads((run / "status.json").read_text())
            out = {"project": "ours" if root == ROOT else f"ours ({root})", "first_shown_s": round(t_shown, 2), "shown_loss": float(shown[0]),
                   "shown_step": int(shown[1]) if shown[1] else None,
                   "first_step_loss_s": round(first["time"] - t_click, 2) if first.get("step") == 1 else None,
                   "first_logged_step": first.get("step"),
                   "click_to_supervisor_s": round(status["started_at"] - t_click, 2) if status.get("started_at") else None,
                   # the web server's own CPU seconds from the click to the loss shown (its polls of the run's files)
                   "server_cpu_s": round(cpu.user + cpu.system - server_cpu.user - server_cpu.system, 2)}
            if m:
                out["startup"] = m.group(1)
                # the rank's process start: its first step's end (logged time) minus the seconds it counts from start
                out["click_to_rank_start_s"] = round(first["time"] - float(m.group(2)) - t_click, 2)
            return out
    finally:
        kill_tree_groups(ws)


def lf_once(browser, venv: Path, work: Path, timeout_s: float, logging_steps: int | None, compute_type: str,
            extra_args: str) -> dict:
    (work / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(IDENTITY, work / "data" / "identity.json")
    (work / "data" / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "identity.json"}}))
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False",
               DISABLE_VERSION_CHECK="1", HF_HUB_OFFLINE="1", BROWSER="true",
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")  # its runner starts `llamafactory-cli`
    env.pop("PYTHONPATH", None)
    with Server([str(venv / "bin" / "llamafactory-cli"), "webui"], work, env, work / "server.log", port) as server:
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.set_default_timeout(60_000)
        page.goto(server.url)
        lang = page.get_by_role("listbox", name="Language", exact=True)
        if lang.input_value() != "en":
            lang.click()
            page.get_by_role("option", name="en", exact=True).click()
        name = page.get_by_role("listbox", name="Model name", exact=True)
        name.click()
        name.fill("SmolLM2-135M-Instruct")
        page.get_by_role("option", name="SmolLM2-135M-Instruct", exact=True).click()
        page.wait_for_function("() => [...document.querySelectorAll('input')].some(i => i.value === 'smollm2')")
        # the page fills the model path with the hub id (its own label has no accessible name): replace it
        path = next(b for b in page.locator("textarea, input[type=text]").all()
                    if b.input_value() == "HuggingFaceTB/SmolLM2-135M-Instruct")
        path.fill(str(MODEL))
        path.press("Tab")
        data = page.get_by_role("textbox", name="Dataset", exact=True).first  # the Train tab's (Evaluate has one)
        data.click()
        page.get_by_role("option", name="identity", exact=True).click()
        page.keyboard.press("Escape")
        if compute_type:
            box = page.get_by_role("listbox", name="Compute type", exact=True)
            box.click()
            page.get_by_role("option", name=compute_type, exact=True).click()
        if logging_steps is not None or extra_args:
            page.get_by_text("Extra configurations").click()
        if logging_steps is not None:
            box = page.get_by_label("number input for Logging steps", exact=True)
            box.fill(str(logging_steps))
            box.press("Tab")
        if extra_args:
            box = next(b for b in page.locator("textarea, input[type=text]").all()
                       if b.input_value().startswith('{"optim"'))
            box.fill(extra_args)
            box.press("Tab")
        start = page.get_by_role("button", name="Start", exact=True)
        settle(server.proc.pid)
        t_click = time.time()
        start.click()
        # its log box is Markdown: the log in a code block (textContent: no layout, cheap at POLL_MS)
        shown = wait_text(page, """() => { for (const e of document.querySelectorAll('pre, code')) {
            const m = e.textContent.match(/'loss': ([0-9.]+)/); if (m) return m[1];
            if (/Failed|Exit code/.test(e.textContent)) return 'failed: ' + e.textContent.slice(-2000) } return null }""",
                          timeout_s)
        if shown.startswith("failed"):
            raise SystemExit(f"LlamaBoard: the run {shown}")
        t_shown = time.time() - t_click
        page.close()
        log = next(work.glob("saves/*/lora/*/trainer_log.jsonl"))
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        first = next(r for r in rows if r.get("loss") is not None)
        # its rows carry no wall time: the file's first write is its first row (read now, within a tick of it)
        return {"project": "llamaboard", "first_shown_s": round(t_shown, 2), "shown_loss": float(shown),
                "shown_step": first["current_steps"], "logging_steps": logging_steps or 5,
                "first_step_loss_s": round(t_shown, 2) if first["current_steps"] == 1 else None,
                "first_logged_step": first["current_steps"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lf-venv", type=Path, help="venv with llamafactory 0.9.5 (see bench/llamafactory.py)")
    ap.add_argument("--lf-logging-steps", type=int, default=None,
                    help="set LlamaBoard's logging-steps slider (default: leave its default, 5)")
    ap.add_argument("--lf-compute-type", default="fp32", choices=["bf16", "fp16", "fp32", "pure_bf16", ""],
                    help="LlamaBoard's compute type (default fp32: its default, bf16, stops at once on a machine "
                         "without CUDA; '' leaves its default)")
    ap.add_argument("--lf-extra-args", default="",
                    help=f"replace LlamaBoard's extra-arguments box ('' leaves it; bf16 on a CPU needs {LF_BF16_CPU!r}; "
                         "on an AVX2-only CPU, which emulates bf16, it did not finish one optimizer step in 6 minutes)")
    ap.add_argument("--no-ours", action="store_true", help="LlamaBoard only")
    ap.add_argument("--root", action="append", type=Path, default=[],
                    help="also time another checkout of ours (repeatable; e.g. an earlier revision, with models/ in it)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for a first loss")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    load = os.getloadavg()
    roots = ([] if args.no_ours else [ROOT]) + [r.resolve() for r in args.root]
    order = [str(r) for r in roots] + (["llamaboard"] if args.lf_venv else [])
    results: dict[str, list[dict]] = {k: [] for k in order}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for i in range(args.runs):
            for project in order if i % 2 == 0 else order[::-1]:  # alternate, so load drifts hit all alike
                with tempfile.TemporaryDirectory(prefix="wb-first-loss-") as tmp:
                    r = (ours_once(browser, Path(tmp), args.timeout, Path(project)) if project != "llamaboard" else
                         lf_once(browser, args.lf_venv, Path(tmp), args.timeout, args.lf_logging_steps,
                                 args.lf_compute_type, args.lf_extra_args))
                r["loadavg_1m"] = round(os.getloadavg()[0], 2)
                results[project].append(r)
                print(json.dumps(r), flush=True)
        browser.close()
    print(f"\nload average before {load[0]:.2f} {load[1]:.2f}, after {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print("| project | runs | click → first shown loss, median (s) | shown at step | click → first step's loss, median (s) |")
    print("|---|---|---|---|---|")
    for rows in results.values():
        if not rows:
            continue
        project = rows[0]["project"]
        first_step = [r["first_step_loss_s"] for r in rows if r["first_step_loss_s"] is not None]
        print(f"| {project} | {len(rows)} | {statistics.median(r['first_shown_s'] for r in rows):.1f} "
              f"({', '.join(str(r['first_shown_s']) for r in rows)}) | {rows[0]['shown_step']} | "
              f"{f'{statistics.median(first_step):.1f}' if first_step else 'not logged'} |")
    print("The table compares each page's first *shown* loss with its own defaults (LlamaBoard's at step "
          f"{(args.lf_logging_steps or 5)}, of 16 examples each; ours at step 1, of 4).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
