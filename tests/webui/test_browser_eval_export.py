"""Evaluate, Export and Chat in a real Chromium, on a tiny LoRA run trained through engine.run.launch:
evaluate the base against the checkpoint, export it merged (with a GGUF f16 file) and chat with the export
loaded as a plain model. Screenshots go to the test's temp dir."""

from __future__ import annotations

import math
import time

import pytest

from engine.run import launch, rundir
from engine.run.config import RunConfig
from webui_server import MARKS, ROOT, Server, ask, open_page, pick, set_max_new_tokens

pytestmark = MARKS


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-export")
    workspace = tmp / "ws"
    cfg = RunConfig.model_validate({
        "model": {"path": str(tiny_model)},
        "data": {"datasets": ["identity"], "registry": str(ROOT / "data" / "dataset_info.yaml"), "cutoff_len": 128},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 2e-3, "save_steps": 3,
                     "logging_steps": 1, "precision": "fp32"},
        "output": {"run_dir": str(workspace / "runs" / "20250101-000000-sft-lora")},
    })
    run = launch.start(cfg)
    status = launch.wait(run, timeout=300)
    assert status is not None and status.state == "completed", (status, rundir.log_tail(run))
    server = Server(workspace, tmp / "webui.log", args=["--data-root", str(tmp)])  # the export goes to tmp/exported
    server.start()
    yield server.url, run, tmp
    server.stop()


def test_evaluate_export_and_chat_with_the_export(server):
    from playwright.sync_api import expect, sync_playwright

    url, run, tmp = server
    shots = tmp / "shots"
    shots.mkdir()
    ckpt = f"{run.name}/final"
    t0 = time.time()
    with sync_playwright() as pw:
        browser, page = open_page(pw, url, height=1400)

        page.get_by_role("tab", name="Evaluate").click()
        page.locator("#ev-base input, #ev-base textarea").first.fill("")  # empty: the base recorded with the checkpoint
        pick(page, "#ev-ckpts", ckpt)
        page.locator("#ev-max input").fill("4")
        page.locator("#ev-new input").fill("8")
        page.locator("#btn-eval").click()
        expect(page.locator("#ev-status .wb-job")).to_have_attribute("data-state", "completed", timeout=180_000)
        table = page.locator("#ev-table")
        expect(table).to_contain_text(ckpt, timeout=10_000)
        cells = [c.strip() for c in table.inner_text().splitlines() if c.strip()]
        header = cells[cells.index("model"): cells.index("rouge-l") + 1]
        assert header == ["model", "loss", "perplexity", "bleu-4", "rouge-1", "rouge-2", "rouge-l"], cells
        base_row = next(i for i, c in enumerate(cells) if c.startswith("base ("))
        rows = {cells[i]: [float(x) for x in cells[i + 1: i + len(header)]] for i in (base_row, cells.index(ckpt))}
        (base_loss, base_ppl, *_), (ckpt_loss, ckpt_ppl, *_) = rows.values()
        assert ckpt_loss < base_loss and ckpt_ppl < base_ppl, rows  # three LoRA steps already lower the loss
        assert base_ppl == pytest.approx(math.exp(base_loss), rel=1e-3)
        page.screenshot(path=shots / "1-evaluate.png", full_page=True)
        t_eval = time.time() - t0

        page.get_by_role("tab", name="Export").click()
        pick(page, "#ex-ckpt", ckpt)
        out = tmp / "exported"
        page.locator("#ex-dir input, #ex-dir textarea").first.fill(str(out))
        pick(page, "#ex-dtype", "float32")
        page.locator("#ex-gguf").get_by_label("f16", exact=True).check()  # not bf16
        page.locator("#btn-export").click()
        expect(page.locator("#ex-status .wb-job")).to_have_attribute("data-state", "completed", timeout=240_000)
        expect(page.locator("#ex-result")).to_be_visible(timeout=10_000)
        assert float(page.locator("#ex-diff").inner_text()) < 1e-4  # merged fp32 vs. adapter model
        assert float(page.locator(".ex-gguf-diff").inner_text()) < 0.05  # the f16 GGUF loaded in llama.cpp
        expect(page.locator("#ex-result")).to_contain_text("exported-f16.gguf")
        assert (out / "model.safetensors").is_file() and (out / "gguf" / "exported-f16.gguf").is_file()
        page.screenshot(path=shots / "2-export.png", full_page=True)
        t_export = time.time() - t0 - t_eval

        page.get_by_role("tab", name="Chat").click()
        page.locator("#chat-model input, #chat-model textarea").first.fill(str(out))
        page.locator("#btn-chat-load").click()
        status = page.locator("#chat-status")
        expect(status).to_have_attribute("data-state", "loaded", timeout=120_000)
        set_max_new_tokens(page, 24)
        _, lengths = ask(page, "Who are you?", timeout=90)
        assert len(lengths) >= 2, f"the answer did not stream (lengths seen: {sorted(lengths)})"
        page.screenshot(path=shots / "3-chat.png", full_page=True)
        page.locator("#btn-chat-unload").click()
        expect(status).to_have_attribute("data-state", "empty", timeout=30_000)
        browser.close()
    print(f"evaluate {t_eval:.0f} s, export {t_export:.0f} s, chat {time.time() - t0 - t_eval - t_export:.0f} s; "
          f"screenshots: {shots}")
