"""A stand-in for launch.spawn shared by the queue tests: real, idle process groups, so liveness is checked for real."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from engine.run import rundir


class FakeSpawn:
    """Stands in for launch.spawn: starts `sleep` in a new session and writes the status spawn would."""

    def __init__(self):
        self.spawned: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}

    def __call__(self, run_dir):
        proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
        self.procs[run_dir.name] = proc
        self.spawned.append(run_dir.name)
        rundir.update_status(run_dir, state="running", pid=proc.pid, pgid=proc.pid, started_at=time.time())
        return proc.pid

    def finish(self, name, state="completed"):
        rundir.update_status(self.root / name, state=state, ended_at=time.time())
        self.kill(name)

    def kill(self, name):
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def cleanup(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def spawn(tmp_path):
    s = FakeSpawn()
    s.root = tmp_path / "ws" / "runs"
    yield s
    s.cleanup()


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")  # with a tokenizer file, enough for check(): the engine never runs here
    (path / "tokenizer.json").write_text("{}")
    return path
