"""Shared pieces of the browser tests: the real `workbench webui` in a subprocess, and Debian Chromium."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from engine.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
MARKS = [pytest.mark.browser, pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium")]


class Server:
    """`workbench webui` on a free loopback port, in its own process session so it can be restarted."""

    def __init__(self, workspace: Path, log: Path, port: int | None = None):
        self.workspace, self.log, self.port = workspace, log, port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> float:
        t0 = time.time()
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(ROOT / ".venv/bin/workbench"), "webui", "--port", str(self.port),
                                          "--workspace", str(self.workspace)], cwd=ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if urllib.request.urlopen(self.url, timeout=2).status == 200:
                    return time.time() - t0
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"server did not answer within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def open_page(playwright, url: str, height: int = 1000):
    """Launch Debian Chromium and open ``url``; returns (browser, page)."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.set_default_timeout(30_000)
    page.goto(url)
    return browser, page
