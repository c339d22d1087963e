"""The interactive curves in a real Chromium: hover a point of the loss plot and read its step and value, switch a
series off and on, an eval that appears, drag to zoom into a range of steps, compare runs, switch the language;
every series shown is drawn in its colour."""

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
    """The series drawn as lines in a colour (each line's accessible label names its series; a series missing from
    the chart's colour scale gets a path without a stroke, which no one sees)."""
    # one read in the page: the plot redraws while it polls, so walking a locator list races the redraw
    paths = page.locator(f"{plot} svg .mark-line path").evaluate_all(
        "paths => paths.map(p => [p.getAttribute('aria-label') || '', p.getAttribute('stroke') || ''])")
    return sorted({m.group(1) for label, stroke in paths
                   for m in [re.search(r"series: ([\w-]+)", label)] if m and stroke not in ("", "none")})


def _wait_legend(page, plot: str, want: list[str], timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while _legend(page, plot) != sorted(want) and time.time() < deadline:
        time.sleep(0.3)
    assert _legend(page, plot) == sorted(want)


def test_hover_reads_a_point_and_series_switch_off_and_on(tmp_path):
    from playwright.sync_api import sync_playwright

    workspace = tmp_path / "ws"
    run_id = _finished_run(workspace)
    other = _finished_run(workspace, "20260102-000000-sft")
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
            _wait_legend(page, "#loss-plot", ["raw", "smoothed"], 30)

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
            _wait_legend(page, "#loss-plot", ["smoothed"])
            page.locator("#train-series label", has_text="raw").click()
            _wait_legend(page, "#loss-plot", ["raw", "smoothed"])  # back, and in its colour

            # an eval that appears while the page watches is drawn too
            with open(workspace / "runs" / run_id / rundir.METRICS, "a") as f:
                f.write(json.dumps({"step": 5, "eval_loss": 1.5, "time": 1_800_000_011}) + "\n")
            _wait_legend(page, "#loss-plot", ["eval", "raw", "smoothed"])

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

            # compare two runs, one picked after the other: both drawn
            page.get_by_role("tab", name="Runs").click()
            page.locator("#runs-table [role=row]", has_text=other).first.wait_for()
            for n, run in enumerate((run_id, other)):
                page.locator("#compare-runs input").first.click()
                page.keyboard.type(run)  # with a run picked, the list opens on what is typed
                page.locator("#compare-runs").get_by_role("option", name=run).first.click()
                page.keyboard.press("Escape")
                _wait_legend(page, "#overlay-plot", [run_id, other][:n + 1])

            # another language: the open run's curve and the Train tab's, under their Chinese names
            page.locator("#runs-table [role=row]", has_text=run_id).first.locator("[role=gridcell]").first.click()
            _wait_legend(page, "#run-plot", ["eval", "raw", "smoothed"])
            page.locator("#lang input").click()
            page.get_by_role("option", name="中文").click()
            _wait_legend(page, "#run-plot", ["原始", "平滑", "评估"])
            _wait_legend(page, "#overlay-plot", [run_id, other])
            page.get_by_role("tab", name="训练").click()
            _wait_legend(page, "#loss-plot", ["原始", "平滑", "评估"])
            browser.close()
    finally:
        server.stop()


def _eval_job(workspace, name: str, models: list[str]) -> None:
    from engine.run import jobs

    job = jobs.job_root("eval", workspace) / name
    job.mkdir(parents=True)
    (job / rundir.CONFIG).write_text("kind: eval\n")
    rows = [{"model": m, "loss": 1.0, "perplexity": 2.7, "bleu-4": 10.0 + i, "rouge-1": 20.0 + i, "rouge-2": 5.0,
             "rouge-l": 15.0 + i} for i, m in enumerate(models)]
    jobs.write_result(job, {"rows": rows, "predictions": {}})
    rundir.write_status(job, rundir.Status(state="completed", started_at=1_800_000_000, ended_at=1_800_000_010))


def test_the_scores_chart_colours_the_models_of_every_job_shown(tmp_path):
    """Gradio's chart keeps the colour domain of the rows it was built with; a second job's models must not be drawn
    without colour."""
    from playwright.sync_api import sync_playwright

    workspace = tmp_path / "ws"
    jobs_models = {"20260101-000000-eval": ["base (a)", "run-a/final"],
                   "20260102-000000-eval": ["base (b)", "run-b/final", "run-c/final"]}
    for name, models in jobs_models.items():
        _eval_job(workspace, name, models)
    server = Server(workspace, tmp_path / "server.log")
    server.start()
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, server.url, height=1400)
            page.get_by_role("tab", name="Evaluate").click()
            for name, models in jobs_models.items():
                pick(page, "#ev-job", name)
                deadline, coloured = time.time() + 20, set()
                while coloured != set(models) and time.time() < deadline:
                    time.sleep(0.3)
                    bars = page.locator("#ev-chart svg .mark-rect path").evaluate_all(
                        "ps => ps.map(p => [p.getAttribute('aria-label') || '', p.getAttribute('fill') || ''])")
                    coloured = {m.group(1) for label, fill in bars for m in [re.search(r"model: ([^;]+)", label)]
                                if m and fill not in ("", "none")}
                assert coloured == set(models), (name, coloured)
            browser.close()
    finally:
        server.stop()
