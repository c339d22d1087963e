"""Long context in a fixed memory budget: the longest cutoff_len that trains within an RSS budget, ours and
LLaMA-Factory's, one after the other on the same machine.

Default model, LoRA r8 on all linear layers, batch 1, a few steps per length, each example longer than the
longest cutoff (alpaca answers joined into long ones, so every step trains a full-length sequence). Ours runs with
``training.memory_gb`` set to the budget, LLaMA-Factory with its defaults. A run whose
training processes pass the budget is killed at once and reported "out of budget"; longer lengths are then
not tried for that project.

    .venv/bin/python bench/long_context.py [--lengths 1024,2048,4096,8192,16384] [--steps 5] [--budget-gb 6]
        [--lf-venv /tmp/lfvenv]   # with LLaMA-Factory's column (bench/llamafactory.py says how to install it)

Prints one JSON line per run and then the table (peak RSS and tokens/s, or out of budget).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "datasets" / "alpaca_en_demo.json"


def long_dataset(dest: Path, chars: int, count: int = 8) -> Path:
    """``count`` alpaca examples whose answers are other answers joined until ``chars`` characters."""
    rows = json.loads(SOURCE.read_text(encoding="utf-8")) if SOURCE.is_file() else [
        json.loads(line) for line in (ROOT / "data" / "instruct_demo.jsonl").read_text(encoding="utf-8").splitlines()]
    answers = [r["output"] for r in rows if r.get("output")]
    out = []
    for i in range(count):
        text, j = [], i
        while sum(map(len, text)) < chars:
            text.append(answers[j % len(answers)])
            j += 7
        out.append({"instruction": rows[i]["instruction"], "input": rows[i].get("input", ""),
                    "output": "\n\n".join(text)})
    dest.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    return dest


def run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def cell(result: dict | None) -> str:
    if result is None:
        return "not tried"
    if result.get("out_of_budget"):
        return f"out of budget ({result['peak_rss_gb']} GB reached)"
    if "error" in result:
        return f"failed: {result['error'][0][:60]}"
    return f"{result['peak_rss_gb']} GB, {result['tokens_per_s']} tok/s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-gb", type=float, default=6.0)
    ap.add_argument("--lf-venv", default=None, help="venv with llamafactory (adds its column)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    # ours is told the budget (training.memory_gb: gradient_checkpointing auto plans the run to fit it), as a user
    # with that much memory would; LLaMA-Factory runs with its defaults (gradient checkpointing on every layer)
    projects = {"workbench": [sys.executable, "bench/train_speed.py", "--memory-gb", str(args.budget_gb)]}
    if args.lf_venv:
        projects["LLaMA-Factory"] = [sys.executable, "bench/llamafactory.py", "--venv", args.lf_venv]
    table: dict[str, dict[int, dict]] = {p: {} for p in projects}
    with tempfile.TemporaryDirectory(prefix="wb-long-") as tmp:
        data = long_dataset(Path(tmp) / "long.json", chars=max(lengths) * 6)  # ~4 chars a token: every cutoff bites
        for length in lengths:
            for name, base in projects.items():
                if any(r.get("out_of_budget") or "error" in r for r in table[name].values()):
                    continue  # a shorter length already did not fit
                common = ["--cutoff-len", str(length), "--batch-size", "1", "--steps", str(args.steps),
                          "--dataset", str(data), "--max-samples", "8", "--rss-budget-gb", str(args.budget_gb)]
                result = run(base + common)
                table[name][length] = result
                print(json.dumps({"project": name, "cutoff_len": length, **result}), flush=True)
    print(f"\nLoRA r8, batch 1, {args.steps} steps, RSS budget {args.budget_gb} GB, load {os.getloadavg()[0]:.1f}")
    print("| cutoff_len | " + " | ".join(projects) + " |")
    print("|---|" + "---|" * len(projects))
    for length in lengths:
        print(f"| {length} | " + " | ".join(cell(table[p].get(length)) for p in projects) + " |")
    fits = {p: max([n for n, r in table[p].items() if "tokens_per_s" in r], default=0) for p in projects}
    print("longest that fits: " + ", ".join(f"{p} {n}" for p, n in fits.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
