"""Time `workbench webui` from launch to the first HTTP 200 on its page, as `make webui` starts it.

    .venv/bin/python bench/webui_startup.py [--runs 5] [--root CHECKOUT]

Each run starts the server in a fresh workspace, polls http://127.0.0.1:PORT/ every 50 ms until it answers 200,
then stops it. ``--root`` times another checkout of the project with the same interpreter (PYTHONPATH=CHECKOUT),
so two revisions can be compared in one session: run them alternately, as ``--compare`` does. Prints one JSON
object per root (seconds per run, median) and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_200(root: Path, timeout: float = 120.0) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory() as ws:
        env = {**os.environ, "PYTHONPATH": str(root)}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "webui", "--port", str(port), "--workspace", ws],
                                cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            while time.perf_counter() - start < timeout:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited with code {proc.returncode} before answering ({root})")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                        if r.status == 200:
                            return time.perf_counter() - start
                except OSError:
                    pass
                time.sleep(0.05)
            raise SystemExit(f"no HTTP 200 within {timeout:.0f} s ({root})")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--root", action="append", type=Path, help="checkout to time (repeatable; default: this one)")
    args = ap.parse_args()
    roots = [r.resolve() for r in (args.root or [ROOT])]
    times: dict[Path, list[float]] = {r: [] for r in roots}
    load = os.getloadavg()[0]
    for r in roots:  # warm the page cache and the .pyc files; not counted
        time_to_200(r)
    for _ in range(args.runs):
        for r in roots:  # alternate, so a change in load hits every root alike
            times[r].append(round(time_to_200(r), 2))
    for r in roots:
        print(json.dumps({"root": str(r), "seconds_to_http_200": times[r], "median": statistics.median(times[r]),
                          "loadavg_before": round(load, 2), "loadavg_after": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
