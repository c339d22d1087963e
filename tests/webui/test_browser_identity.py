"""The page's main job, as a user does it: open the page, keep its defaults (the default model, the identity
data, LoRA), click Start, wait for the run to complete, then chat with it in the Chat tab: it has a new name.

Slow (a 69-step LoRA run of the 135M default model: about 2.5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import re
import time

import pytest

from webui_server import MARKS, Server, ask, open_page

pytestmark = [*MARKS, pytest.mark.slow, pytest.mark.heavy]  # the default model: five minutes; make test-all


def test_default_run_then_chat_knows_its_new_name(default_model, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    server = Server(tmp_path / "ws", tmp_path / "server.log")
    server.start()
    try:
        with sync_playwright() as pw:
            browser, page = open_page(pw, server.url, height=1100)
            page.get_by_role("tab", name="Data").click()
            page.locator("#data-total[data-total='90']").wait_for()  # identity, preselected
            page.get_by_role("tab", name="Train").click()
            t0 = time.time()
            page.locator("#btn-start").click()
            deadline = time.time() + 1200
            card = {}
            while time.time() < deadline:
                card = page.locator("#run-card").evaluate("e => ({...e.dataset})")
                if card.get("state") in ("completed", "failed", "stopped"):
                    break
                time.sleep(2)
            assert card.get("state") == "completed", page.locator("#run-card").inner_text()
            trained_s = time.time() - t0
            run_id = card["run"]

            page.get_by_role("tab", name="Chat").click()
            page.locator("#chat-run input").click()
            page.get_by_role("option", name=run_id).click()
            expect(page.locator("#chat-ckpt input")).to_have_value(re.compile(r"^final"), timeout=15_000)
            page.locator("#btn-chat-load").click()
            expect(page.locator("#chat-status")).to_have_attribute("data-state", "loaded", timeout=180_000)
            answer, _ = ask(page, "Who are you?", timeout=180)
            page.screenshot(path=tmp_path / "identity-chat.png", full_page=True)
            browser.close()
        assert "Orion" in answer, answer
        print(f"run {run_id}: trained in {trained_s:.0f} s from the click; answer: {answer!r}")
    finally:
        server.stop()
