"""Bring your own data in a real Chromium: upload a CSV with its own column names, map them, see the trained
tokens highlighted, save it to the workspace registry, train on it.

Screenshots are kept in the test's temp dir (printed at the end; pytest -s shows it).
"""

from __future__ import annotations

import time

from engine.run import rundir
from engine.run.config import load_config
from engine.data import load_registry
from webui_server import MARKS, Server, choose_model, open_page, pick

pytestmark = MARKS


def test_upload_map_preview_save_and_train(tiny_model, tmp_path):
    from playwright.sync_api import sync_playwright

    csv = tmp_path / "support_faq.csv"
    rows = ["ticket,question,answer"] + [f"{i},How do I reset password {i}?,Open settings and choose reset {i}."
                                         for i in range(1, 25)]
    csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    shots = tmp_path / "screens"
    shots.mkdir()
    workspace = tmp_path / "ws"
    server = Server(workspace, tmp_path / "server.log", args=["--data-root", str(tiny_model)])  # typed into the page
    server.start()
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, server.url, height=1400)
            page.wait_for_selector("#tabs")
            choose_model(page, tiny_model)

            # upload: the format cannot be told from question/answer, and the page says so
            page.get_by_role("tab", name="Data").click()
            page.locator("#data-add").get_by_text("Add a dataset").click()
            page.locator("#data-upload input[type=file]").set_input_files(str(csv))
            page.locator("#data-errors").get_by_text("cannot tell the format from the keys (answer, question, ticket)").wait_for()

            # map the file's own columns: question -> instruction, answer -> output
            pick(page, "#data-format", "alpaca (sft)")
            pick(page, "#map-instruction", "question")
            pick(page, "#map-output", "answer")
            page.locator("#btn-data-check").click()
            page.locator("#data-check-head[data-valid='24'][data-errors='0']").wait_for()
            page.locator("#data-example .wb-bubble", has_text="How do I reset password 1?").wait_for()
            trained = page.locator("#data-token-preview .wb-tok-body .wb-trained")
            trained.first.wait_for()
            assert "Open settings and choose reset 1." in trained.all_inner_texts()[0]
            assert "How do I reset password 1?" in " ".join(page.locator("#data-token-preview .wb-tok-body .wb-masked").all_inner_texts())
            block = page.locator("#data-token-preview .wb-tokens").first
            tokens, n_trained = int(block.get_attribute("data-tokens")), int(block.get_attribute("data-trained"))
            assert 0 < n_trained < tokens
            page.locator("#data-hist img").wait_for()
            assert page.locator("#data-lengths").get_attribute("data-truncated") == "0"
            page.screenshot(path=shots / "1-preview.png", full_page=True)

            # save: registered in the workspace, selected, and the only dataset once identity is removed
            page.locator("#data-name textarea").fill("support_faq")
            page.locator("#btn-data-save").click()
            page.locator("#data-saved[data-name='support_faq']").wait_for()
            spec = load_registry(workspace / "datasets" / "dataset_info.yaml")["support_faq"]
            assert spec.path == workspace / "datasets" / "support_faq.csv"
            assert spec.columns == {"instruction": "question", "output": "answer"}
            datasets = page.locator("#f-data-datasets")
            datasets.get_by_text("support_faq").wait_for()
            datasets.locator(".token", has_text="identity").locator(".token-remove").click()
            page.locator("#data-total[data-total='24']").wait_for()
            page.screenshot(path=shots / "2-saved.png", full_page=True)

            # train on it
            page.get_by_role("tab", name="Hyperparameters").click()
            steps = page.locator("#f-training-max_steps input")
            steps.fill("3")
            steps.press("Tab")
            page.get_by_role("tab", name="Train").click()
            t_click = time.time()
            page.locator("#btn-start").click()
            card = page.locator("#run-card[data-state='completed']")
            card.wait_for(timeout=180_000)
            seconds = time.time() - t_click
            run_id = card.get_attribute("data-run")
            page.screenshot(path=shots / "3-trained.png", full_page=True)
            browser.close()
    finally:
        server.stop()
    run_dir = workspace / "runs" / run_id
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.data.datasets == ["support_faq"] and cfg.data.registry == str(workspace / "datasets" / "dataset_info.yaml")
    assert rundir.read_status(run_dir).state == "completed"
    assert '"examples": 24' in (run_dir / "train.log").read_text()
    print(f"\nscreenshots: {shots}\nStart -> completed (3 steps): {seconds:.1f} s")
