"""The interactive curves in a real Chromium: hover a point of the loss plot and read its step and value, switch a
series off and on, and drag to zoom into a range of steps."""

from __future__ import annotations

import json
import re
import time

from engine.run import rundir
from engine.run.config import RunConfig, dump_config
from webui_server import MARKS, Server, open_page, pick

pytestmark = MARKS

LOSSES = {s: round(3.0 - 0.25 * s, 4) for s in range(1, 11)}


def _finished_run(workspace, run_id="20260101-000000-sft"):
    run_dir = workspace / "runs" / run_id
    run_dir.mkdir(parents=True)
    dump_config(RunConfig.model_validate({"output": {"run_dir": str(run_dir)}}), run_dir / rundir.CONFIG)
    rows = [{"step": s, "total_steps": 10, "loss": v, "learning_rate": 1e-4, "tokens": 500 * s, "elapsed_s": 2.0 * s,
             "time": 1_800_000_000 + 2 * s} for s, v in LOSSES.items()]
    (run_dir / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    rundir.write_status(run_dir, rundir.Status(state="completed", step=10, total_steps=10, started_at=1_800_000_000,
                                               ended_at=1_800_000_020))
    return run_id


def _legend(page, plot: str) -> list[str]:
    """The series drawn as lines (each line's accessible label names its series)."""
    # one read in the page: the plot redraws while it polls, so walking a locator list races the redraw
    labels = page.locator(f"{plot} svg .mark-line path").evaluate_all(
        "paths => paths.map(p => p.getAttribute('aria-label') || '')")
    return sorted({m.group(1) for m in map(lambda a: re.search(r"series: (\w+)", a), labels) if m})


def test_hover_reads_a_point_and_series_switch_off_and_on(tmp_path):
    from playwright.sync_api import sync_playwright

    workspace = tmp_path / "ws"
    run_id = _finished_run(workspace)
    server = Server(workspace, tmp_path / "server.log")
    server.start()
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, server.url)
            page.wait_for_selector("#tabs")
            page.get_by_role("tab", name="Train").click()
            pick(page, "#watch-run", run_id)
            page.locator("#run-card[data-state=completed]").wait_for()
            plot = page.locator("#loss-plot svg").first
            plot.wait_for()
            deadline = time.time() + 30
            while sorted(_legend(page, "#loss-plot")) != ["raw", "smoothed"] and time.time() < deadline:
                time.sleep(0.3)
            assert sorted(_legend(page, "#loss-plot")) == ["raw", "smoothed"]

            # hover: the tooltip names the nearest point's series, step, value (titled Loss) and clock time
            box = page.locator("#loss-plot svg .mark-line path").first.bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
            tip = page.locator("#vg-tooltip-element")
            tip.wait_for(state="visible")
            text = tip.inner_text()
            step = int(re.search(r"step\s+(\d+)", text).group(1))
            value = float(re.search(r"Loss\s+([\d.]+)", text).group(1))
            series = re.search(r"series\s+(\w+)", text).group(1)
            assert step in LOSSES and re.search(r"time\s+\d\d:\d\d:\d\d", text), text
            assert series == "smoothed" or abs(value - LOSSES[step]) < 1e-3, (text, LOSSES[step])

            # series: switch the raw loss off, then on again
            page.locator("#train-series label", has_text="raw").click()
            deadline = time.time() + 15
            while _legend(page, "#loss-plot") != ["smoothed"] and time.time() < deadline:
                time.sleep(0.3)
            assert _legend(page, "#loss-plot") == ["smoothed"]
            page.locator("#train-series label", has_text="raw").click()
            deadline = time.time() + 15
            while sorted(_legend(page, "#loss-plot")) != ["raw", "smoothed"] and time.time() < deadline:
                time.sleep(0.3)
            assert sorted(_legend(page, "#loss-plot")) == ["raw", "smoothed"]

            # zoom: drag across the middle of the plot; the x axis then ends before step 10
            def x_labels():
                return set(page.locator("#loss-plot svg .role-axis-label text").all_text_contents())  # one read: the plot redraws

            assert x_labels() & {"10", "10.0"}
            box = page.locator("#loss-plot svg .mark-line path").first.bounding_box()
            y = box["y"] + box["height"] * 0.5
            page.mouse.move(box["x"] + box["width"] * 0.2, y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=8)
            page.mouse.up()
            deadline = time.time() + 15
            while x_labels() & {"10", "10.0"} and time.time() < deadline:
                time.sleep(0.3)
            assert not x_labels() & {"10", "10.0"}, x_labels()
            page.screenshot(path=str(tmp_path / "curves.png"))
            browser.close()
    finally:
        server.stop()
