"""The device queue of a workspace: exports, the chat worker and `workbench train` all take their device through it.

Spawning is replaced by FakeSpawn (real, idle process groups) where the job itself does not matter.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
import yaml

from engine.cli import main
from engine.run import rundir
from engine.run.config import ConfigError, RunConfig
from engine.run.jobconfig import ExportConfig
from engine.run.queue import QUEUE, Device, DeviceQueue
from queue_fixtures import FakeSpawn, model_dir, spawn  # noqa: F401 - fixtures
from webui.runs import RunManager

CPU = [Device("cpu", "CPU")]




def _run_cfg(model_dir) -> RunConfig:
    cfg = RunConfig()
    cfg.model.path = str(model_dir)
    return cfg


def test_an_export_waits_while_a_run_holds_the_device_and_starts_when_it_ends(tmp_path, model_dir, spawn, tiny_model):
    from test_export import make_adapter

    m = RunManager(tmp_path / "ws", devices=CPU, spawn=spawn)
    run = m.start(_run_cfg(model_dir))
    ckpt = make_adapter(tiny_model, tmp_path / "lora" / "checkpoint-2")
    export = m.submit(ExportConfig.model_validate({"model": {"checkpoint": str(ckpt)}, "output": {"dtype": "float32"}}))
    assert export.queued and export.waiting_for == [run.id]
    assert export.run_dir.parent == m.workspace / "exports" and (export.run_dir / QUEUE).is_file()
    status = rundir.read_status(export.run_dir)
    assert status.state == "queued" and status.kind == "export"
    assert m.tick() == [] and spawn.spawned == [run.id]
    kinds = {r.id: r.kind for r in m.runs(None)}  # the Runs view lists every job, with its kind
    assert kinds == {run.id: "train", export.id: "export"}
    spawn.finish(run.id)
    assert m.tick() == [export.run_dir] and spawn.spawned == [run.id, export.id]


@pytest.mark.slow  # a real load in the worker process: about a minute on a busy CPU
def test_the_chat_worker_reserves_its_device_until_unload(tmp_path, model_dir, spawn, tiny_model):
    from engine.serve.worker import InferenceWorker

    m = RunManager(tmp_path / "ws", devices=CPU, spawn=spawn)
    worker = InferenceWorker(m.workspace)
    try:
        worker.load(str(tiny_model))
        holder = m.busy()["cpu"]
        assert holder == worker.reservation
        run = m.start(_run_cfg(model_dir))
        assert run.queued and run.waiting_for == [worker.reservation]
        assert m.tick() == []
    finally:
        worker.unload()
    assert m.busy() == {} and m.tick() == [run.run_dir]


def test_a_reservation_whose_process_died_is_stale(tmp_path):
    q = DeviceQueue(tmp_path / "ws", devices=CPU)
    proc = subprocess.Popen(["sleep", "60"])
    q.reserve("chat-x", proc.pid)
    assert q.busy() == {"cpu": "chat-x"}
    proc.kill()
    proc.wait()
    assert q.busy() == {} and not (tmp_path / "ws" / "reservations" / "chat-x.json").exists()


def test_the_ui_refuses_a_run_directory_outside_the_workspace(tmp_path, model_dir, spawn):
    m = RunManager(tmp_path / "ws", devices=CPU, spawn=spawn)
    cfg = _run_cfg(model_dir)
    cfg.output.run_dir = str(tmp_path / "elsewhere" / "run")
    with pytest.raises(ConfigError) as err:
        m.start(cfg)
    [(field, message)] = err.value.problems
    assert field == "output.run_dir" and "outside the workspace" in message
    assert not (tmp_path / "elsewhere").exists() and spawn.spawned == []
    cfg.output.run_dir = str(m.workspace / "runs" / "mine")
    assert not m.start(cfg).queued


# ---------------------------------------------------------------- `workbench train` and the queue

@pytest.fixture
def held(tmp_path):
    """The workspace's CPU held by a live reservation (as the chat worker holds it)."""
    q = DeviceQueue(tmp_path / "ws", devices=CPU)
    proc = subprocess.Popen(["sleep", "120"])
    q.reserve("holder", proc.pid)
    yield q, proc
    proc.kill()
    proc.wait()


def _config_file(tmp_path, model_dir):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(model_dir)}}))
    return path


def _fake_spawn(monkeypatch, calls):
    """launch.spawn for these tests: the job 'runs' and completes at once."""
    from engine.run import launch

    def fake(job_dir):
        calls.append(job_dir.name)
        (job_dir / rundir.LOG).touch()
        rundir.update_status(job_dir, state="completed", started_at=time.time(), ended_at=time.time())
        return None

    monkeypatch.setattr(launch, "spawn", fake)
    monkeypatch.setattr("engine.run.queue.visible_devices", lambda: CPU)


def _only_run(ws):
    [run_dir] = list((ws / "runs").iterdir())
    return run_dir


def test_cli_train_joins_the_queue_and_a_waiter_starts_it_later(tmp_path, model_dir, held, capsys):
    ws = tmp_path / "ws"
    code = main(["train", str(_config_file(tmp_path, model_dir)), "--workspace", str(ws)])
    out = capsys.readouterr().out
    assert code == 0 and "queued: its devices are held by holder" in out and "workbench stop" in out
    run_dir = _only_run(ws)
    assert rundir.read_status(run_dir).state == "queued" and (run_dir / QUEUE).is_file()
    assert main(["stop", str(run_dir)]) == 0  # cancelled while queued: the waiter leaves without starting it
    deadline = time.time() + 15
    while time.time() < deadline and "left the queue" not in (run_dir / rundir.LOG).read_text():
        time.sleep(0.2)
    assert "left the queue: stopped" in (run_dir / rundir.LOG).read_text()
    assert rundir.read_status(run_dir).state == "stopped"


def test_cli_train_in_the_foreground_waits_its_turn_and_starts_itself(tmp_path, model_dir, held, monkeypatch, capsys):
    calls = []
    _fake_spawn(monkeypatch, calls)
    q, proc = held
    threading.Timer(2.0, proc.kill).start()  # the holder goes away while the command waits
    code = main(["train", str(_config_file(tmp_path, model_dir)), "--workspace", str(tmp_path / "ws"), "--foreground"])
    out = capsys.readouterr().out
    assert "queued: its devices are held by holder" in out and code == 0
    run_dir = _only_run(tmp_path / "ws")
    assert calls == [run_dir.name] and rundir.read_status(run_dir).state == "completed"
    assert not (run_dir / QUEUE).exists()


def test_cli_no_queue_starts_at_once(tmp_path, model_dir, held, monkeypatch, capsys):
    calls = []
    _fake_spawn(monkeypatch, calls)
    code = main(["train", str(_config_file(tmp_path, model_dir)), "--workspace", str(tmp_path / "ws"), "--no-queue"])
    out = capsys.readouterr().out
    run_dir = _only_run(tmp_path / "ws")
    assert code == 0 and "queued" not in out and calls == [run_dir.name]
    assert not (run_dir / QUEUE).exists() and json.loads((run_dir / "status.json").read_text())["kind"] == "train"
