"""Standard training benchmark: a 30-step LoRA SFT of the default model, launched like any run.

Workload (shared/datasets/README.md): SmolLM2-135M-Instruct, LoRA rank 8 / alpha 16 on all linear layers,
the first 256 samples of alpaca_en_demo.json, cutoff 512, per-device batch 4, accumulation 1, lr 1e-4
cosine, 30 steps, seed 42. Prints input tokens per second (every token we compute on is a real token:
batches are padding-free) and the peak RSS of the training process.

    .venv/bin/python bench/train_speed.py [--quantization nf4] [--precision fp32|bf16] [--steps 30]
        [--gradient-checkpointing [auto|off|on]] [--memory-gb GB] [--batch-by examples|tokens]
        [--mmap-threshold BYTES]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.data.registry import PROJECT_REGISTRY  # noqa: E402
from engine.run import launch, rundir  # noqa: E402
from engine.run.config import DEFAULT_MODEL, RunConfig  # noqa: E402


def dataset_path() -> Path:
    shared = ROOT.parent / "shared" / "datasets" / "alpaca_en_demo.json"
    if shared.is_file():
        return shared
    print("note: ../shared/datasets/alpaca_en_demo.json is absent; using data/instruct_demo.jsonl", file=sys.stderr)
    return ROOT / "data" / "instruct_demo.jsonl"


class PeakRSS(threading.Thread):
    """Samples the RSS of the run's training ranks (processes running engine.train) every 0.2 s; with a budget,
    stops the run at once (kill) when their RSS passes it."""

    def __init__(self, run_dir: Path, budget: float | None = None):
        super().__init__(daemon=True)
        self.run_dir, self.peak, self.done = run_dir, 0, threading.Event()
        self.cpu: dict[int, float] = {}  # pid -> user + system CPU seconds, last sampled
        self.budget, self.over = budget, False

    def run(self):
        while not self.done.is_set():
            status = rundir.read_status_raw(self.run_dir)
            if status and status.pid:
                try:
                    for p in psutil.Process(status.pid).children(recursive=True):
                        if "engine.train" in " ".join(p.cmdline()):
                            self.peak = max(self.peak, p.memory_info().rss)
                            times = p.cpu_times()
                            self.cpu[p.pid] = times.user + times.system
                except psutil.Error:
                    pass
                if self.budget and self.peak > self.budget and not self.over:
                    self.over = True
                    launch.stop(self.run_dir, force=True)
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="none", choices=["none", "nf4"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", default=str(ROOT / DEFAULT_MODEL))
    parser.add_argument("--gradient-checkpointing", nargs="?", const="on", default="auto", choices=["auto", "off", "on"],
                        help="training.gradient_checkpointing (bare flag: on, every layer, LLaMA-Factory's default)")
    parser.add_argument("--memory-gb", type=float, default=0.0,
                        help="training.memory_gb: the budget gradient_checkpointing auto plans for")
    parser.add_argument("--batch-by", default="examples", choices=["examples", "tokens"],
                        help="training.batch_by: tokens packs each batch to cutoff x batch tokens")
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="per-device batch")
    parser.add_argument("--dataset", default=None, help="alpaca-format file (default: the standard workload's)")
    parser.add_argument("--max-samples", type=int, default=256)
    parser.add_argument("--rss-budget-gb", type=float, default=None,
                        help="kill the run when its ranks' RSS passes this and report it out of budget")
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the ranks: allocations above it are returned on free")
    args = parser.parse_args()
    if args.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)

    cfg = RunConfig.model_validate({
        "model": {"path": args.model, "quantization": args.quantization},
        "method": {"finetuning_type": "qlora" if args.quantization != "none" else "lora", "lora_rank": 8,
                   "lora_alpha": 16, "lora_target": "all-linear"},
        "data": {"datasets": [args.dataset or str(dataset_path())], "max_samples": args.max_samples,
                 "cutoff_len": args.cutoff_len,
                 "registry": str(PROJECT_REGISTRY)},
        "training": {"max_steps": args.steps, "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-4, "lr_scheduler_type": "cosine", "seed": 42, "logging_steps": 1,
                     "save_steps": 10_000, "precision": args.precision,
                     "gradient_checkpointing": args.gradient_checkpointing, "batch_by": args.batch_by,
                     "memory_gb": args.memory_gb},
    })
    with tempfile.TemporaryDirectory(prefix="wb-bench-") as tmp:
        cfg.output.run_dir = str(Path(tmp) / "run")
        t0 = time.time()
        run_dir = launch.start(cfg)
        sampler = PeakRSS(run_dir, args.rss_budget_gb * 1e9 if args.rss_budget_gb else None)
        sampler.start()
        status = launch.wait(run_dir)
        sampler.done.set()
        wall = time.time() - t0
        rows = [r for r in rundir.read_metrics(run_dir) if "loss" in r]
        tail = rundir.log_tail(run_dir, 400).splitlines()
        said = [line.split("gradient checkpointing ", 1)[1] for line in tail if "engine.train: gradient checkpointing " in line]
        startup = [line.split("start-up: ", 1)[1] for line in tail if "start-up: " in line]
        # what `precision: auto` resolved to on this machine (engine/train/entry.py logs it)
        chosen = [line.split("engine.train: precision ", 1)[1].split(",")[0] for line in tail
                  if "engine.train: precision " in line]
        planned = {"checkpointing": said[-1]} if said else {}
        if sampler.over:
            print(json.dumps({"out_of_budget": True, "rss_budget_gb": args.rss_budget_gb, "cutoff_len": args.cutoff_len,
                              "peak_rss_gb": round(sampler.peak / 1e9, 2), "steps_done": len(rows), **planned}, indent=1))
            return 0
        if status is None or status.state != "completed" or not rows:
            print(rundir.log_tail(run_dir, 30), file=sys.stderr)
            return 1
        # Training time: from the first step's start to the last step's end (elapsed_s is measured
        # from train begin, so it excludes process start, data loading and model loading).
        last = rows[-1]
        result = {
            "workload": f"LoRA r8 SFT, {args.steps} steps, batch {args.batch_size}, cutoff {args.cutoff_len}, "
                        f"{args.quantization}, {args.precision}"
                        + f", gradient checkpointing {args.gradient_checkpointing}"
                        + (f" within {args.memory_gb} GB" if args.memory_gb else "")
                        + (", token-budget batches" if args.batch_by == "tokens" else "")
                        + (f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else ""),
            **({"precision": chosen[-1]} if chosen else {}),
            "input_tokens": last["tokens"],
            "train_seconds": round(last["elapsed_s"], 1),
            "tokens_per_s": round(last["tokens"] / last["elapsed_s"], 1),
            "peak_rss_gb": round(sampler.peak / 1e9, 2),
            # CPU seconds of the training ranks (load, start-up included): less sensitive to other jobs than tokens/s
            "rank_cpu_s": round(sum(sampler.cpu.values()), 1),
            "wall_seconds_incl_launch": round(wall, 1),
            # where the wall time outside the steps goes: launch to the first step's start, the last step's end to exit
            "before_steps_s": round(last["time"] - last["elapsed_s"] - t0, 1),
            "after_steps_s": round(t0 + wall - last["time"], 1),
            **({"startup": startup[-1]} if startup else {}),
            "first_loss": round(rows[0]["loss"], 4),
            "last_loss": round(last["loss"], 4),
            **planned,
        }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
