"""The standard benchmark workload run by LLaMA-Factory, for a same-session comparison with train_speed.py.

LLaMA-Factory is not a dependency: install it into a separate venv first (its pins differ from ours):

    python3 -m venv /tmp/lfvenv && /tmp/lfvenv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/c.txt && /tmp/lfvenv/bin/pip install -c /tmp/c.txt llamafactory==0.9.5
    # no torchvision/torchaudio build matches torch 2.13: remove them; LLaMA-Factory imports torchaudio
    # unconditionally (for audio data only), so give it an empty package
    /tmp/lfvenv/bin/pip uninstall -y torchvision torchaudio
    mkdir -p /tmp/lfvenv/lib/python3.11/site-packages/torchaudio && touch /tmp/lfvenv/lib/python3.11/site-packages/torchaudio/__init__.py
    /tmp/lfvenv/bin/pip install -c /tmp/c.txt bitsandbytes==0.50.2  # for --quantization 4 (ours uses the same)
    .venv/bin/python bench/llamafactory.py --venv /tmp/lfvenv [--bf16] [--quantization 4]

Same workload as train_speed.py (shared/datasets/README.md), with LLaMA-Factory's defaults otherwise
(gradient checkpointing on, padded batches, template smollm2). Prints non-padding input tokens per second
(HF's include_num_input_tokens_seen=non_padding over train_runtime) and the training process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "alpaca_en_demo.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", required=True, help="venv with llamafactory installed")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--quantization", type=int, choices=[4], default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="per-device batch")
    parser.add_argument("--dataset", type=Path, default=DATA, help="alpaca-format file (default: the standard workload's)")
    parser.add_argument("--max-samples", type=int, default=256)
    parser.add_argument("--rss-budget-gb", type=float, default=None,
                        help="kill the run when its processes' RSS passes this and report it out of budget")
    args = parser.parse_args()
    if not args.dataset.is_file():
        print(f"needs {args.dataset}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="wb-lf-") as tmp:
        tmp = Path(tmp)
        (tmp / "dataset_info.json").write_text(json.dumps({"alpaca_en_demo": {"file_name": str(args.dataset.resolve())}}))
        cfg = {
            "model_name_or_path": args.model, "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "lora_rank": 8, "lora_alpha": 16, "lora_target": "all", "dataset": "alpaca_en_demo",
            "dataset_dir": str(tmp), "template": "smollm2", "cutoff_len": args.cutoff_len, "max_samples": args.max_samples,
            "overwrite_cache": True, "preprocessing_num_workers": 1, "output_dir": str(tmp / "out"),
            "logging_steps": 1, "save_steps": 100000, "per_device_train_batch_size": args.batch_size,
            "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "max_steps": args.steps,
            "lr_scheduler_type": "cosine", "seed": 42, "report_to": "none", "bf16": args.bf16,
            "include_num_input_tokens_seen": "non_padding", "disable_tqdm": True,
        }
        if args.quantization:
            cfg["quantization_bit"] = args.quantization
        if args.bf16:  # transformers refuses bf16 on a CPU without bf16 units unless told the run is on the CPU
            cfg["use_cpu"] = True
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        env = {**psutil.Process().environ(), "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
        t0 = time.time()
        proc = subprocess.Popen([str(Path(args.venv) / "bin" / "llamafactory-cli"), "train", str(tmp / "cfg.yaml")],
                                stdout=open(tmp / "log.txt", "w"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        peak, over = 0, False
        while proc.poll() is None:
            try:
                procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
                peak = max([peak] + [p.memory_info().rss for p in procs])
            except psutil.Error:
                pass
            if args.rss_budget_gb and peak > args.rss_budget_gb * 1e9 and not over:
                over = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
        wall = time.time() - t0
        if over:
            print(json.dumps({"out_of_budget": True, "rss_budget_gb": args.rss_budget_gb,
                              "cutoff_len": args.cutoff_len, "peak_rss_gb": round(peak / 1e9, 2)}, indent=1))
            return 0
        state = tmp / "out" / "trainer_state.json"
        if proc.returncode != 0 or not state.is_file():
            print((tmp / "log.txt").read_text()[-4000:], file=sys.stderr)
            return 1
        logs = json.loads(state.read_text())["log_history"]
        tokens = max(r.get("num_input_tokens_seen", 0) for r in logs)
        # LLaMA-Factory's own log: throughput = tokens seen / seconds since training began, at each step. The
        # trainer's train_runtime is not used: under this venv's transformers it reported 4.8 s for a 6-minute run.
        rows = [json.loads(line) for line in (tmp / "out" / "trainer_log.jsonl").read_text().splitlines() if line.strip()]
        last = [r for r in rows if r.get("throughput")][-1]
        seconds = last["total_tokens"] / last["throughput"]
        print(json.dumps({
            "workload": f"LLaMA-Factory LoRA r8 SFT, {args.steps} steps, batch {args.batch_size}, cutoff {args.cutoff_len}, "
                        f"{'bf16' if args.bf16 else 'fp32'}{', 4-bit' if args.quantization else ''}",
            "input_tokens_non_padding": tokens,
            "train_seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1),
            "peak_rss_gb": round(peak / 1e9, 2),
            "wall_seconds_incl_launch": round(wall, 1),
            "first_loss": round(next(r["loss"] for r in logs if "loss" in r), 4),
            "last_loss": round([r["loss"] for r in logs if "loss" in r][-1], 4),
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
