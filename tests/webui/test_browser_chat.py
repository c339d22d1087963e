"""The Chat tab in a real Chromium: pick a run's checkpoint, load it into the worker, ask, watch it stream, unload.

The run is a tiny-model LoRA checkpoint written to disk (no training). Screenshots go to the test's temp dir.
"""

from __future__ import annotations

import json
import re
import time

import psutil
import pytest

from chat_fixtures import make_lora_run
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
