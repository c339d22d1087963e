"""Shared pieces of the browser tests: the real `workbench webui` in a subprocess, and Debian Chromium."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from engine.run.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
MARKS = [pytest.mark.browser, pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium")]


class Server:
    """`workbench webui` on a free loopback port, in its own process session so it can be restarted."""

    def __init__(self, workspace: Path, log: Path, port: int | None = None, args: list[str] = ()):
        self.workspace, self.log, self.port, self.args = workspace, log, port or free_port(), list(args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> float:
        t0 = time.time()
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(ROOT / ".venv/bin/workbench"), "webui", "--port", str(self.port),
                                          "--workspace", str(self.workspace), *self.args], cwd=ROOT, env=env,
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


def choose_model(page, model) -> None:
    """Type a model folder into the Model tab's path box, as a user does, and wait for its info box."""
    path_box = page.locator("#f-model-path input")
    path_box.fill(str(model))
    path_box.press("Enter")
    page.locator("#model-info-box").get_by_text(model.name).wait_for()


def pick(page, dropdown: str, option: str) -> None:
    """Open a dropdown and click the option with exactly this label."""
    page.locator(f"{dropdown} input").first.click()
    page.locator(dropdown).get_by_role("option", name=option, exact=True).first.click()


def wait_code_text(page, elem: str, text: str, timeout: float = 30) -> None:
    """Wait until the code box ``elem`` shows a line containing ``text``. CodeMirror renders only the lines near
    the window's viewport, so the box is brought into view, as a reader would scroll to it, and scrolled through
    until the line is rendered (or the time is up)."""
    import time

    deadline = time.time() + timeout
    scroller = page.locator(f"{elem} .cm-scroller")
    while True:
        if page.locator(elem).get_by_text(text).count():
            return
        if time.time() > deadline:
            raise AssertionError(f"{elem} never showed {text!r}")
        page.locator(elem).first.scroll_into_view_if_needed()
        if scroller.count():
            scroller.first.evaluate("e => { e.scrollTop = e.scrollTop + e.clientHeight >= e.scrollHeight ? 0"
                                    " : e.scrollTop + e.clientHeight / 2 }")
        page.wait_for_timeout(250)


def set_max_new_tokens(page, n: int) -> None:
    """Open the Chat tab's sampling accordion and set max new tokens (checked on the slider before sending)."""
    from playwright.sync_api import expect

    page.get_by_text("System prompt and sampling").click()
    number = page.locator("#chat-max-new-tokens input[type=number]")
    slider = page.locator("#chat-max-new-tokens input[type=range]")
    expect(number).to_be_visible()
    # The accordion renders its contents as it opens, and a re-render can put the initial value back a moment
    # later (seen once on a loaded machine: the slider showed 40, the answer had 512 tokens): the value has to
    # stay put over two checks half a second apart.
    steady = 0
    for _ in range(12):
        if slider.input_value() != str(n) or number.input_value() != str(n):
            steady = 0
            number.fill(str(n))
            number.press("Tab")
        page.wait_for_timeout(500)
        steady = steady + 1 if slider.input_value() == number.input_value() == str(n) else 0
        if steady == 2:
            break
    expect(slider).to_have_value(str(n))


def ask(page, text: str, timeout: float = 120) -> tuple[str, set[int]]:
    """Send a chat message and wait for the usage line; returns the answer and the answer lengths the page showed
    while it streamed (more than one non-zero length means it streamed). A MutationObserver records every change
    of the last answer's text, so a fast machine that streams a short answer within one poll still shows it."""
    from playwright.sync_api import expect

    bot = page.locator("#chat-bot")
    page.evaluate("""() => {
        const box = document.querySelector('#chat-bot');
        const sel = '.message.bot, [data-testid=bot]';
        const before = box.querySelectorAll(sel).length;  // earlier answers in this chat are not this one
        window.__wbLengths = new Set();
        if (window.__wbObserver) window.__wbObserver.disconnect();
        window.__wbObserver = new MutationObserver(() => {
            const answers = box.querySelectorAll(sel);
            if (answers.length > before) window.__wbLengths.add(answers[answers.length - 1].innerText.length);
        });
        window.__wbObserver.observe(box, {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#chat-msg textarea").fill(text)
    page.locator("#btn-chat-send").click()
    expect(bot).to_contain_text(text, timeout=30_000)
    expect(page.locator("#chat-usage")).to_contain_text("generated", timeout=timeout * 1000)
    seen = page.evaluate("() => { window.__wbObserver.disconnect(); return [...window.__wbLengths]; }")
    answer = bot.locator(".message.bot, [data-testid=bot]").last
    return answer.inner_text(), {n for n in seen if n > 0}
