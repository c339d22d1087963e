"""The whole loop in a real Chromium: start a LoRA run, watch its curve, stop, restart the server, resume.

Screenshots of every stage are kept in the test's temp dir (printed at the end; pytest -s shows it).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


from engine.run import rundir
from webui_server import MARKS, Server, choose_model, open_page, wait_code_text

pytestmark = MARKS


def _kill_runs(workspace: Path) -> None:
    for run in rundir.list_runs(workspace):
        status = rundir.read_status_raw(run)
        if status and rundir.group_alive(status.pgid):
            os.killpg(status.pgid, signal.SIGKILL)


def _card(page) -> dict:
    """The status card's data attributes, read in one go (the card is replaced every tick)."""
    return page.locator("#run-card").evaluate("e => ({...e.dataset})")


def _wait_card(page, predicate, timeout: float, what: str) -> dict:
    deadline = time.time() + timeout
    card = {}
    while time.time() < deadline:
        card = _card(page)
        if card.get("state") == "failed":
            raise AssertionError(f"the run failed: {page.locator('#run-card').inner_text()}")
        if predicate(card):
            return card
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; card: {card}")


def test_start_watch_stop_restart_resume(tiny_model, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = tmp_path / "screens"
    shots.mkdir()
    workspace = tmp_path / "ws"
    server = Server(workspace, tmp_path / "server.log", args=["--data-root", str(tiny_model)])  # typed into the page
    n = iter(range(1, 100))

    def shot(page, name):
        page.screenshot(path=shots / f"{next(n):02d}-{name}.png", full_page=True)

    server.start()
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, server.url)
            page.wait_for_selector("#tabs")

            # 2. a tiny model, a demo dataset, LoRA
            choose_model(page, tiny_model)
            page.locator("#f-method-finetuning_type").get_by_text("LoRA", exact=True).click()
            shot(page, "model")
            page.get_by_role("tab", name="Data").click()
            page.locator("#data-total[data-total='90']").wait_for()  # identity is preselected: 90 rows
            shot(page, "data")
            page.get_by_role("tab", name="Hyperparameters").click()
            steps = page.locator("#f-training-max_steps input")
            steps.fill("300")  # long enough that Stop, not the end, ends it
            steps.press("Tab")
            page.get_by_role("tab", name="Train").click()
            page.get_by_text("Preview the exact config and command").click()  # filled when the tab opens
            wait_code_text(page, "#preview-yaml", "max_steps: 300")
            wait_code_text(page, "#preview-cmd", "engine.train")
            shot(page, "preview")
            t_click = time.time()
            page.locator("#btn-start").click()

            # 3. the loss plot gets 3 points and the progress bar moves
            first = _wait_card(page, lambda c: int(c["points"] or 0) >= 1, 120, "the first loss point")
            t_first = time.time() - t_click
            card = _wait_card(page, lambda c: int(c["points"] or 0) >= 3 and int(c["step"]) > int(first["step"]), 60,
                              "3 loss points and the step moving")
            run_id = card["run"]
            assert card["state"] == "running" and int(card["total"]) == 300
            assert int(card["step"]) > int(first["step"]) >= 1
            width = page.locator("#run-card .wb-bar-fill").evaluate("e => parseFloat(e.style.width)")
            assert width > 0
            page.locator("#loss-plot svg").first.wait_for()
            shot(page, "training")

            # closing the tab does not pause training; a new page opens on the live run
            page.close()
            time.sleep(4)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(server.url)
            page.locator("#btn-stop").wait_for()  # the Train tab is shown at once
            card = _wait_card(page, lambda c: c.get("run") == run_id and int(c["points"]) > int(card["points"]), 60,
                              "more points after the tab was closed")
            assert card["state"] == "running"

            # 4. Stop: status stopped, with a checkpoint listed
            page.locator("#btn-stop").click()
            card = _wait_card(page, lambda c: c["state"] == "stopped", 120, "state stopped")
            stopped_step = int(card["step"])
            ckpts = rundir.checkpoints(workspace / "runs" / run_id)
            assert ckpts and ckpts[-1][0] == stopped_step
            page.locator("#resume-ckpt input").click()
            page.get_by_role("option", name=f"checkpoint-{stopped_step}").wait_for()
            page.keyboard.press("Escape")
            shot(page, "stopped")
            browser.close()

        # 5. restart the server: the run is listed with its curve
        server.stop()
        server.start()
        with sync_playwright() as p:
            browser, page = open_page(p, server.url)
            page.wait_for_selector("#tabs")
            page.get_by_role("tab", name="Runs").click()
            row = page.locator("#runs-table [role=row]", has_text=run_id).first
            row.wait_for()
            assert "stopped" in row.inner_text()
            row.locator("[role=gridcell]").first.click()
            page.locator("#run-plot svg").first.wait_for()
            ckpt_row = page.locator("#ckpt-table [role=row]", has_text=f"checkpoint-{stopped_step}").first
            ckpt_row.wait_for()
            name, step, loss = ckpt_row.locator("[role=gridcell]").all_inner_texts()[:3]
            assert (name, int(step)) == (f"checkpoint-{stopped_step}", stopped_step) and float(loss) > 0
            page.locator("#compare-runs input").click()
            page.get_by_role("option", name=run_id).click()
            page.keyboard.press("Escape")
            page.locator("#overlay-plot svg").first.wait_for()
            shot(page, "runs-after-restart")
            page.get_by_role("tab", name="Train").click()
            card = _wait_card(page, lambda c: c.get("run") == run_id and int(c["points"] or 0) >= 3, 30,
                              "the re-attached run's curve")
            assert card["state"] == "stopped"

            # 6. resume: steps continue past the checkpoint
            page.locator("#btn-resume").click()
            card = _wait_card(page, lambda c: c["state"] == "running" and int(c["step"]) > stopped_step, 150,
                              f"a step past {stopped_step}")
            shot(page, "resumed")
            page.locator("#btn-stop").click()
            _wait_card(page, lambda c: c["state"] == "stopped", 120, "the resumed run to stop")

            # delete, with confirmation
            page.get_by_role("tab", name="Runs").click()
            page.locator("#btn-delete").click()
            page.locator("#confirm-row").get_by_text(run_id).wait_for()
            shot(page, "confirm-delete")
            page.locator("#btn-confirm-delete").click()
            page.locator("#runs-msg").get_by_text(f"Deleted {run_id}").wait_for()
            assert not (workspace / "runs" / run_id).exists()
            browser.close()
    finally:
        server.stop()
        _kill_runs(workspace)
    print(f"\nscreenshots: {shots}\nStart -> first loss point: {t_first:.1f} s")
