"""Drive the web UI in Chromium through the stage chain PT -> SFT -> RM -> DPO -> RL on the default model and
the demo data, as a user clicks it, and print each stage's wall time and final metrics.

Each stage is a run started from the Train tab; PT, SFT and DPO are merged in the Export tab and the next stage
starts from that export (chosen in the Model tab); RL's reward model is the RM run, picked in Stage settings.

    .venv/bin/python bench/stage_chain_ui.py [--steps pt=30,sft=50,rm=30,dpo=30,rl=10] [--workspace /tmp/chain-ws]

Exports are float32 (as in the README's CLI chain), so each stage starts from lossless weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "webui"))
sys.path.insert(0, str(ROOT))

from webui_server import Server, open_page, pick  # noqa: E402

from engine import rundir  # noqa: E402

STEPS = "pt=30,sft=50,rm=30,dpo=30,rl=10"
CHAIN = [  # stage, dataset, export afterwards
    ("pt", "text_demo", True),
    ("sft", "identity", True),
    ("rm", "preference_demo", False),
    ("dpo", "preference_demo", True),
    ("rl", "preference_demo", False),
]
SHOWN = ("loss", "eval_loss", "accuracy", "eval_accuracy", "margin", "rewards/accuracies", "rewards/margins",
         "reward", "kl", "tokens_per_s")


def set_number(page, elem: str, value) -> None:
    box = page.locator(f"{elem} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def text_of(page, selector: str) -> str:
    box = page.locator(selector)
    return box.first.inner_text() if box.count() else ""


def wait_job(page, selector: str, before: str, timeout: float) -> str:
    """The final state of the job shown in ``selector`` once it is another job than ``before``."""
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        if text_of(page, f"{selector} b") not in ("", before):
            state = page.locator(selector).first.get_attribute("data-state") or ""
            if state in ("completed", "failed", "stopped"):
                return state
        time.sleep(1)
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default=STEPS, help="max_steps per stage, stage=N,...")
    parser.add_argument("--workspace", default="/tmp/chain-ws")
    args = parser.parse_args()
    steps = {k: int(v) for k, v in (item.split("=") for item in args.steps.split(","))}
    from playwright.sync_api import expect, sync_playwright

    workspace = Path(args.workspace)
    server = Server(workspace, workspace.parent / (workspace.name + "-server.log"))
    server.start()
    from engine.run.config import DEFAULT_MODEL

    model = str(ROOT / DEFAULT_MODEL)
    results, rm_final = [], None
    try:
        with sync_playwright() as pw:
            browser, page = open_page(pw, server.url, height=1400)
            page.wait_for_selector("#tabs")
            for stage, dataset, export in CHAIN:
                t0 = time.time()
                page.get_by_role("tab", name="Model").click()
                path_box = page.locator("#f-model-path input")
                path_box.fill(model)
                path_box.press("Enter")
                page.get_by_role("tab", name="Data").click()
                pick(page, "#f-method-stage", stage)
                page.wait_for_timeout(1500)  # the dataset choices follow the stage
                chosen = page.locator("#f-data-datasets").inner_text()
                if dataset not in chosen:
                    pick(page, "#f-data-datasets", dataset)
                page.get_by_role("tab", name="Hyperparameters").click()
                set_number(page, "#f-training-max_steps", steps[stage])
                if stage == "rl":
                    pick(page, "#f-method-reward_model", rm_final)
                page.get_by_role("tab", name="Train").click()
                before = text_of(page, "#train-msg")
                page.locator("#btn-start").click()
                deadline = time.time() + 60
                while time.time() < deadline and (text_of(page, "#train-msg") == before
                                                  or "Started run" not in text_of(page, "#train-msg")):
                    time.sleep(0.5)
                expect(page.locator("#train-msg")).to_contain_text("Started run", timeout=1)
                run_id = text_of(page, "#train-msg").split("Started run ", 1)[1].split()[0].rstrip(".")
                assert run_id.endswith(f"-{stage}-lora"), run_id
                run = workspace / "runs" / run_id
                deadline = time.time() + 1800
                while time.time() < deadline:
                    status = rundir.read_status(run)
                    if status and status.state in ("completed", "failed", "stopped"):
                        break
                    time.sleep(2)
                page.wait_for_timeout(3000)  # the card and plots catch up
                page.screenshot(path=workspace.parent / f"chain-{stage}.png", full_page=True)
                rows = [r for r in rundir.read_metrics(run) if "loss" in r]
                evals = [r for r in rundir.read_metrics(run) if "eval_loss" in r]
                last = {**(rows[-1] if rows else {}), **(evals[-1] if evals else {})}
                result = {"stage": stage, "run": run_id, "state": status.state if status else None,
                          "model": Path(model).name, "train_wall_s": round(time.time() - t0, 1),
                          **{k: round(last[k], 4) for k in SHOWN if isinstance(last.get(k), (int, float))}}
                if not status or status.state != "completed":
                    result["error"] = status.error if status else "no status"
                    results.append(result)
                    break
                if stage == "rm":
                    rm_final = f"{run_id}/{rundir.FINAL}"
                if export:
                    t1 = time.time()
                    page.get_by_role("tab", name="Export").click()
                    pick(page, "#ex-ckpt", f"{run_id}/final")
                    out = workspace / "exports" / f"chain-{stage}"
                    page.locator("#ex-dir input, #ex-dir textarea").first.fill(str(out))
                    pick(page, "#ex-dtype", "float32")
                    before = text_of(page, "#ex-status .wb-job b")
                    page.locator("#btn-export").click()
                    state = wait_job(page, "#ex-status .wb-job", before, 900)
                    result["export_s"] = round(time.time() - t1, 1)
                    result["export_state"] = state
                    if state != "completed":
                        results.append(result)
                        break
                    model = str(out)
                results.append(result)
                print(json.dumps(result), flush=True)
            browser.close()
    finally:
        server.stop()
    print(json.dumps(results, indent=1))
    return 0 if len(results) == len(CHAIN) and all(r.get("state") == "completed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
