"""bench/gpu_check.py on the CPU (--tiny): every row of the GPU check's table is produced, with numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = ["workbench lora", "workbench qlora", "workbench full zero2", "trl lora", "trl qlora"]


@pytest.mark.heavy
@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(default_model, shared_datasets, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OUT", None)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                          "--out", str(tmp_path), "--data", str(shared_datasets / "alpaca_en_demo.json"),
                          "--tokenizer", str(default_model)],
                         capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in out.stdout.splitlines() if line.startswith("| "))}
    for name in ROWS:
        tokens_per_s, memory, mfu, steps, _after = rows[name]
        assert float(tokens_per_s.replace(",", "")) > 0, name
        assert re.fullmatch(r"\d+\.\d\d GB", memory) and float(memory.split()[0]) > 0.05, (name, memory)  # peak RSS
        assert mfu == "n/a (cpu)" and steps == "3", (name, mfu, steps)
    chat = re.fullmatch(r"TTFT (\d+) ms, decode ([\d.]+) tok/s \((\d+) tokens; after unload n/a\)", rows["chat worker"][0])
    assert chat and int(chat[3]) > 1 and float(chat[2]) > 0, rows["chat worker"]
    assert "MFU = 6 * N * tokens/s / 989000000000000" in out.stdout and "6N is the usual approximation" in out.stdout
    assert "workbench lora: packed_sdpa" in out.stdout  # the CPU keeps the per-example loop
    assert (tmp_path / "table.md").is_file() and (tmp_path / "results.json").is_file()
