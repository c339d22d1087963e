"""Several machines from the page, in a real Chromium: pick 'Several machines', upload a hostfile, start, watch the
loss, stop. The two nodes are ssh host names of a loopback sshd (tests/engine/loopback.py), 1 rank each."""

from __future__ import annotations

import time

import pytest

from engine.run import rundir
from tests.engine.loopback import cluster, missing
from tests.engine.test_nodes import _wait_gone
from webui_server import MARKS, Server, choose_model, open_page, wait_code_text

# heavy: 255 s measured on the 2 shared cores (load ~14), past the ~90 s a test of `make test` may take; `make test-all`
# runs it (a DeepSpeed launch through pdsh on two "nodes", then Stop on both)
pytestmark = [*MARKS, pytest.mark.slow, pytest.mark.heavy,
              pytest.mark.skipif(missing() is not None, reason=missing() or "")]


def _card(page) -> dict:
    return page.locator("#run-card").evaluate("e => ({...e.dataset, text: e.innerText})")


def _wait_card(page, predicate, timeout: float, what: str) -> dict:
    deadline, card = time.time() + timeout, {}
    while time.time() < deadline:
        card = _card(page)
        assert card.get("state") != "failed", f"the run failed: {card.get('text')}"
        if predicate(card):
            return card
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; card: {card}")


def test_several_machines_from_the_page(tiny_model, tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("WORKBENCH_THREADS", "1")  # each "node" would size its ranks' threads by the same two cores
    hostfile = tmp_path / "upload" / "hostfile"
    hostfile.parent.mkdir()
    hostfile.write_text("# two nodes, one rank each\nnode-a slots=1\nnode-b slots=1\n")
    workspace = tmp_path / "ws"
    with cluster(tmp_path / "ssh"):  # sets PDSH_SSH_ARGS_APPEND, which the server and its runs inherit
        server = Server(workspace, tmp_path / "server.log", args=["--data-root", str(tiny_model)])
        server.start()
        run_dir = None
        try:
            with sync_playwright() as p:
                browser, page = open_page(p, server.url, height=1400)
                page.wait_for_selector("#tabs")
                choose_model(page, tiny_model)

                page.get_by_role("tab", name="Hyperparameters").click()
                steps = page.locator("#f-training-max_steps input")
                steps.fill("300")  # Stop, not the end, ends it
                steps.press("Tab")
                page.locator("#acc-distributed").get_by_text("Devices and DeepSpeed").click()
                page.locator("#devices-mode").get_by_text("Several machines", exact=True).click()
                table = page.locator("#f-distributed-nodes")
                expect(table).to_be_visible()
                with page.expect_file_chooser() as chooser:
                    page.locator("#btn-hostfile-upload").click()
                chooser.value.set_files(str(hostfile))
                kept = workspace / "hostfiles" / "hostfile"
                expect(page.locator("#devices-msg")).to_contain_text(f"{kept}: 2 node(s)")
                expect(page.locator("#f-distributed-hostfile textarea, #f-distributed-hostfile input").first).to_have_value(str(kept))
                expect(table).to_contain_text("node-a")
                expect(table).to_contain_text("node-b")
                assert kept.read_text() == hostfile.read_text()  # the upload lives in the workspace
                page.locator("#f-distributed-zero_stage").get_by_text("2 (optimizer + gradients)").click()
                addr = page.locator("#f-distributed-master_addr textarea, #f-distributed-master_addr input").first
                addr.fill("127.0.0.1")  # ssh reaches node-a by its alias; the ranks meet it here
                addr.press("Tab")

                page.get_by_role("tab", name="Train").click()
                page.get_by_text("Preview the exact config and command").click()
                wait_code_text(page, "#preview-cmd", f"--hostfile {kept} --include node-a:0@node-b:0 --master_addr 127.0.0.1")
                wait_code_text(page, "#preview-yaml", "zero_stage: 2")
                page.locator("#btn-start").click()

                card = _wait_card(page, lambda c: int(c.get("points") or 0) >= 2, 420, "two loss points")
                assert card["state"] == "running" and "2 ranks on node-a:0, node-b:0" in card["text"]
                page.locator("#loss-plot svg").first.wait_for()
                run_dir = workspace / "runs" / card["run"]
                losses = [r["loss"] for r in rundir.read_metrics(run_dir) if "loss" in r]
                assert len(losses) >= 2 and all(x == x and x > 0 for x in losses)

                page.locator("#btn-stop").click()
                card = _wait_card(page, lambda c: c["state"] == "stopped", 180, "state stopped")
                assert rundir.checkpoints(run_dir)[-1][0] == int(card["step"])
                browser.close()
            assert _wait_gone(run_dir) == [], "a rank outlived Stop"
        finally:
            server.stop()
            if run_dir is not None and (left := _wait_gone(run_dir, timeout=1)):
                from engine.run import launch

                launch.stop(run_dir, force=True)
                pytest.fail(f"processes left: {left}")
