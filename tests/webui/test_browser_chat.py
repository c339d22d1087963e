"""The Chat tab in a real Chromium: pick a run's checkpoint, load it into the worker, ask, watch it stream, unload;
and side by side: a full checkpoint against its base, two LoRA checkpoints of one run against each other.

The runs are tiny-model checkpoints written to disk (no training). Screenshots go to the test's temp dir.
"""

from __future__ import annotations

import json
import re
import time

import psutil
import pytest

from chat_fixtures import make_full_run, make_lora_run
from webui_server import MARKS, Server, ask, open_page, set_max_new_tokens

pytestmark = MARKS


@pytest.fixture
def server(tiny_model, tmp_path):
    workspace = tmp_path / "ws"
    run = make_lora_run(tiny_model, workspace, step=7)
    (run / "status.json").write_text(json.dumps({"state": "completed", "step": 7, "total_steps": 7}))
    server = Server(workspace, tmp_path / "webui.log")
    server.start()
    yield server.url, run, server.proc
    server.stop()


def _workers(server_pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(server_pid).children(recursive=True) if "multiprocessing" in " ".join(p.cmdline())
            and "resource_tracker" not in " ".join(p.cmdline())]


def test_chat_with_a_checkpoint(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, run, proc = server
    shots = tmp_path / "shots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser, page = open_page(pw, url, height=1100)
        page.get_by_role("tab", name="Chat").click()
        run_box = page.locator("#chat-run input")
        run_box.click()
        page.get_by_role("option", name=run.name).click()
        ckpt_box = page.locator("#chat-ckpt input")
        expect(ckpt_box).to_have_value(re.compile(r"checkpoint-7 · step 7 · loss 2\.5000"), timeout=15_000)
        assert _workers(proc.pid) == []  # nothing loaded yet, so no worker
        page.locator("#btn-chat-load").click()
        status = page.locator("#chat-status")
        expect(status).to_have_attribute("data-state", "loaded", timeout=120_000)
        expect(status).to_contain_text("Chat worker memory")
        workers = _workers(proc.pid)
        assert len(workers) == 1 and workers[0].memory_info().rss > 100 * 2**20
        page.screenshot(path=shots / "1-loaded.png", full_page=True)

        set_max_new_tokens(page, 40)
        text, lengths = ask(page, "Who are you?")
        expect(page.locator("#chat-usage")).to_contain_text("40 generated")
        assert len(lengths) >= 2, f"the answer did not stream (lengths seen: {sorted(lengths)})"
        assert len(text.strip()) > 0
        page.screenshot(path=shots / "2-answered.png", full_page=True)

        page.locator("#btn-chat-unload").click()
        expect(status).to_have_attribute("data-state", "empty", timeout=30_000)
        expect(page.locator("#chat-status-box")).to_contain_text("0 MB")
        page.screenshot(path=shots / "3-unloaded.png", full_page=True)
        deadline = time.time() + 10
        while _workers(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert _workers(proc.pid) == []  # the worker process is gone, so its memory is back
        browser.close()
    print(f"screenshots: {shots}")


@pytest.fixture
def compare_server(tiny_model, tmp_path):
    workspace = tmp_path / "ws"
    full = make_full_run(tiny_model, workspace)
    make_lora_run(tiny_model, workspace, step=3, seed=3)
    lora = make_lora_run(tiny_model, workspace, step=5, seed=5)
    for run, step in ((full, 4), (lora, 5)):
        (run / "status.json").write_text(json.dumps({"state": "completed", "step": step, "total_steps": step}))
    server = Server(workspace, tmp_path / "webui.log")
    server.start()
    yield server.url, full, lora
    server.stop()


def _answers(page, text: str) -> tuple[str, str]:
    """Send ``text`` side by side; both columns' answers once both usage lines are shown."""
    from playwright.sync_api import expect

    page.locator("#chat-msg textarea").fill(text)
    page.locator("#btn-chat-send").click()
    expect(page.locator("#chat-usage-right")).to_contain_text("generated", timeout=120_000)
    expect(page.locator("#chat-usage")).to_contain_text("Left: ")
    bot = ".message.bot, [data-testid=bot]"
    return (page.locator("#chat-bot").locator(bot).last.inner_text(),
            page.locator("#chat-right-bot").locator(bot).last.inner_text())


@pytest.mark.slow
def test_side_by_side(compare_server, tiny_model, tmp_path):
    """A full fine-tuned checkpoint next to its base (a second model, its cost shown before it loads), then two LoRA
    checkpoints of one run (one base, two adapters): each column answers; unticking drops the right side."""
    from playwright.sync_api import expect, sync_playwright

    from engine.serve.sampling import param_count
    from webui_server import pick

    url, full, lora = compare_server
    shots = tmp_path / "shots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser, page = open_page(pw, url, height=1300)
        page.get_by_role("tab", name="Chat").click()
        pick(page, "#chat-run", full.name)
        expect(page.locator("#chat-ckpt input")).to_have_value(re.compile("checkpoint-4"), timeout=15_000)
        page.locator("#btn-chat-load").click()
        expect(page.locator("#chat-status")).to_have_attribute("data-state", "loaded", timeout=120_000)
        page.locator("#chat-side input").check()
        info = page.locator("#chat-right-info")
        expect(info).to_have_attribute("data-kind", "model")  # base of left: a second model, cost shown before it loads
        expect(info).to_have_attribute("data-bytes", str(param_count(tiny_model) * 4))  # float32 on the CPU
        expect(info).to_contain_text("a second model in the chat worker: about 12 MB more")
        page.screenshot(path=shots / "1-full-planned.png", full_page=True)
        page.locator("#btn-chat-right-load").click()
        expect(info).to_have_attribute("data-state", "loaded", timeout=120_000)
        set_max_new_tokens(page, 8)
        left, right = _answers(page, "Who are you?")
        assert left.strip() and right.strip() and left != right
        page.screenshot(path=shots / "2-full-vs-base.png", full_page=True)

        # two LoRA checkpoints of one run: the left one loads with the right side still on (base of left, adapter off)
        page.locator("#btn-chat-clear").click()
        pick(page, "#chat-run", lora.name)
        expect(page.locator("#chat-ckpt input")).to_have_value(re.compile("checkpoint-5"), timeout=15_000)
        page.locator("#btn-chat-load").click()
        expect(info).to_have_attribute("data-kind", "base", timeout=120_000)
        expect(info).to_have_attribute("data-state", "loaded")
        pick(page, "#chat-right", f"{lora.name}/checkpoint-3")
        expect(info).to_have_attribute("data-kind", "adapter")
        expect(info).to_have_attribute("data-state", "planned")
        expect(info).to_contain_text("one base, two named adapters")
        page.locator("#btn-chat-right-load").click()
        expect(info).to_have_attribute("data-state", "loaded", timeout=120_000)
        expect(page.locator("#chat-right-bot")).to_contain_text("checkpoint-3")  # the column's label names it
        left, right = _answers(page, "Who are you?")
        assert left.strip() and right.strip() and left != right
        page.screenshot(path=shots / "3-two-adapters.png", full_page=True)

        page.locator("#chat-side input").uncheck()
        expect(page.locator("#chat-status-box")).to_contain_text("Right side unloaded")
        expect(page.locator("#chat-right-bot")).to_be_hidden()
        browser.close()
    print(f"screenshots: {shots}")
