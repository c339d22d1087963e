"""Ours against LLaMA-Factory on the standard workload, one run after the other in one session: one table.

Runs bench/train_speed.py (our defaults) and bench/llamafactory.py (LLaMA-Factory 0.9.5's defaults) for LoRA fp32
and QLoRA NF4 (double quantization: both projects' default), and with ``--only bf16`` LoRA in bf16 (what
``precision: auto`` picks on a CPU with bf16 units; on one without, both projects emulate it and only the memory
means anything), alternating the two projects, and prints each run's JSON line, then the medians per row with the
ratios the targets of issue 15 name (tokens/s at least 2x LLaMA-Factory's, 3x in bf16; peak RSS at most its own
for LoRA and bf16 and 0.8x for QLoRA; launch to exit at most 0.4x).

    .venv/bin/python bench/versus_llamafactory.py --lf-venv /tmp/lfvenv [--runs 1] [--steps 30] [--only lora,qlora,bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {  # name: (our flags, LLaMA-Factory's flags, peak RSS target as a share of LLaMA-Factory's, speed target)
    "lora": ([], [], 1.0, 2.0),
    "qlora": (["--quantization", "nf4"], ["--quantization", "4"], 0.8, 2.0),
    "bf16": (["--precision", "bf16"], ["--bf16"], 1.0, 3.0),
}
DEFAULT = "lora,qlora"


def run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0 or "{" not in proc.stdout:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"{' '.join(cmd)} failed: {' / '.join(tail)}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lf-venv", required=True, help="venv with llamafactory 0.9.5 (bench/llamafactory.py says how)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--only", default=DEFAULT, help=f"comma-separated, of {', '.join(WORKLOADS)}")
    args = ap.parse_args()
    steps = ["--steps", str(args.steps)]
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.runs):
        for name in args.only.split(","):
            ours, theirs, *_ = WORKLOADS[name]
            for project, cmd in (("workbench", [sys.executable, "bench/train_speed.py", *ours]),
                                 ("LLaMA-Factory", [sys.executable, "bench/llamafactory.py", "--venv", args.lf_venv,
                                                    *theirs])):
                result = run(cmd + steps)
                results.setdefault((name, project), []).append(result)
                print(json.dumps({"row": name, "project": project, "load": round(os.getloadavg()[0], 1),
                                  **result}), flush=True)

    def med(name, project, key):
        return statistics.median(r[key] for r in results[(name, project)])

    print(f"\n{args.steps} steps, LoRA r8 all-linear, cutoff 512, batch 4; medians of {args.runs} run(s); "
          f"load {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs")
    print("| workload | project | input tokens/s | peak RSS | launch to exit |")
    print("|---|---|---|---|---|")
    verdicts = []
    for name in args.only.split(","):
        for project in ("workbench", "LLaMA-Factory"):
            print(f"| {name} | {project} | {med(name, project, 'tokens_per_s'):.1f} |"
                  f" {med(name, project, 'peak_rss_gb'):.2f} GB | {med(name, project, 'wall_seconds_incl_launch'):.1f} s |")
        speed = med(name, "workbench", "tokens_per_s") / med(name, "LLaMA-Factory", "tokens_per_s")
        rss = med(name, "workbench", "peak_rss_gb") / med(name, "LLaMA-Factory", "peak_rss_gb")
        wall = med(name, "workbench", "wall_seconds_incl_launch") / med(name, "LLaMA-Factory", "wall_seconds_incl_launch")
        target, fast = WORKLOADS[name][2:]
        verdicts.append(f"{name}: tokens/s {speed:.2f}x ({'met' if speed >= fast else 'missed'}: >= {fast:g}x), peak RSS "
                        f"{rss:.2f}x ({'met' if rss <= target else 'missed'}: <= {target}x), launch to exit "
                        f"{wall:.2f}x ({'met' if wall <= 0.4 else 'missed'}: <= 0.4x)")
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
