"""The device queue of a workspace: exports, the chat worker and `workbench train` all take their device through it.

Spawning is replaced by FakeSpawn (real, idle process groups) where the job itself does not matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import psutil
import pytest
import yaml

from engine.cli import main
from engine.run import rundir
from engine.run.config import ConfigError, RunConfig
from engine.run.jobconfig import ExportConfig
from engine.run.queue import QUEUE, Device, DeviceQueue, label, start_waiter
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


# ---------------------------------------------------------------- several machines: slots are (host, device)

NODES = [{"host": h, "slots": 2} for h in ("node-a", "node-b", "node-c")]


def _queued_job(ws, name, model_dir, **distributed):
    """A prepared training job (config.yaml, status queued), as launch.prepare leaves one; prepare's ssh pre-flight
    of the nodes is not what these tests are about."""
    from engine.run.config import dump_config

    job = ws / "runs" / name
    job.mkdir(parents=True)
    cfg = _run_cfg(model_dir)
    cfg.distributed = cfg.distributed.model_validate(distributed)
    cfg.output.run_dir = str(job)
    dump_config(cfg, job / rundir.CONFIG)
    rundir.write_status(job, rundir.Status(state="queued", kind="train"))
    return job


@pytest.fixture
def exclusive(spawn):
    """FakeSpawn that fails the test when a job starts while another job holds one of its (host, device) slots."""
    def start(job_dir):
        q = DeviceQueue(job_dir.parents[1], devices=CPU)
        clash = {d: n for d, n in q.held(jobs_only=True).items() if d in q.job_devices(job_dir)}
        assert not clash, f"{job_dir.name} started while {clash} held its slots"
        return spawn(job_dir)
    start.spawned, start.finish = spawn.spawned, spawn.finish
    return start


def test_runs_that_share_a_node_slot_never_overlap_and_other_nodes_stay_free(tmp_path, model_dir, exclusive):
    ws = tmp_path / "ws"
    q = DeviceQueue(ws, devices=CPU, spawn=exclusive)
    ab = _queued_job(ws, "ab", model_dir, nodes=NODES, include="node-a:0,1@node-b:0")
    b0 = _queued_job(ws, "b0", model_dir, nodes=NODES, include="node-b:0@node-c:1")  # shares node-b slot 0 with ab
    c1 = _queued_job(ws, "c1", model_dir, nodes=NODES, include="node-c:1")  # behind b0 on node-c slot 1
    b1 = _queued_job(ws, "b1", model_dir, nodes=NODES, include="node-b:1")
    c0 = _queued_job(ws, "c0", model_dir, hostfile=None, nodes=[NODES[2]], include="node-c:0")
    here = _queued_job(ws, "here", model_dir)  # this machine's CPU
    assert not q.submit(ab).queued
    waits = q.submit(b0)
    assert waits.queued and waits.waiting_for == ["ab"]
    assert json.loads((b0 / QUEUE).read_text())["devices"] == ["node-b:0", "node-c:1"]
    assert q.submit(c1).waiting_for == ["b0"]  # free now, but never jumps the run queued before it
    for job in (b1, c0, here):  # other slots of node-b, node-c, this machine: A+B blocks none of them
        assert not q.submit(job).queued, job.name
    assert q.busy() == {"node-a:0": "ab", "node-a:1": "ab", "node-b:0": "ab", "node-b:1": "b1", "node-c:0": "c0",
                        "cpu": "here"}
    assert q.tick() == []
    exclusive.finish("b1")
    exclusive.finish("c0")
    assert q.tick() == []  # node-b slot 0 is still ab's
    exclusive.finish("ab")
    assert q.tick() == [b0]
    exclusive.finish("b0")
    assert q.tick() == [c1]
    assert exclusive.spawned == ["ab", "b1", "c0", "here", "b0", "c1"]


def test_every_name_of_this_machine_is_one_host(tmp_path, model_dir, spawn):
    import socket

    ws = tmp_path / "ws"
    q = DeviceQueue(ws, devices=CPU, spawn=spawn)
    assert q.reserve("chat", os.getpid(), devices={"localhost:cpu"})["devices"] == ["localhost:cpu"]
    assert q.busy() == {"cpu": "chat"}  # the chat worker's "cpu" and localhost:cpu are one device
    q.release("chat")
    here = _queued_job(ws, "here", model_dir)
    assert not q.submit(here).queued
    for i, name in enumerate(("localhost", "127.0.0.1", socket.gethostname())):
        job = _queued_job(ws, f"as-{i}", model_dir, nodes=[{"host": name, "slots": 2}, NODES[0]])
        assert q.submit(job).waiting_for[0] == "here", name  # this machine's CPU ranks wait for the local run
    gpus = DeviceQueue(ws, devices=[Device("0", "GPU 0"), Device("1", "GPU 1")])
    multi = gpus.config(_queued_job(ws, "gpu", model_dir, nodes=[{"host": socket.gethostname(), "slots": 2}, NODES[1]],
                                    include=f"{socket.gethostname()}:1@node-b:0"))
    assert sorted(map(label, gpus.needs(multi))) == ["1", "node-b:0"]  # GPU 1 here, as a local run's devices=1


def test_the_waiter_process_starts_a_queued_multinode_run_when_its_node_slot_frees(tmp_path, model_dir):
    ws = tmp_path / "ws"
    q = DeviceQueue(ws, devices=CPU)
    holder = subprocess.Popen(["sleep", "120"])
    q.reserve("holder", holder.pid, devices={"node-b:0"})
    job = _queued_job(ws, "ab", model_dir, nodes=NODES, include="node-a:0@node-b:0", launcher="no_ssh",
                      master_port=29999)
    assert q.submit(job).waiting_for == ["holder"]
    waiter = start_waiter(ws, job)
    try:
        time.sleep(3)
        assert rundir.read_status(job).state == "queued" and psutil.pid_exists(waiter)
        holder.kill()
        holder.wait()
        deadline = time.time() + 30
        while time.time() < deadline and "left the queue" not in (job / rundir.LOG).read_text():
            time.sleep(0.2)
        log = (job / rundir.LOG).read_text()
        assert "left the queue: starting" in log or "left the queue: running" in log, log
    finally:
        holder.kill()
        status = rundir.read_status_raw(job)
        if status is not None and status.pgid:  # the run itself is not the subject: end it
            try:
                os.killpg(status.pgid, 9)
            except ProcessLookupError:
                pass
