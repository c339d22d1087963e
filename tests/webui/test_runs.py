"""RunManager: spawn or queue, FIFO per device, re-attach after a restart, stop/cancel/delete, path safety.

Spawning is replaced by a recorder that gives each run a real, idle process group (``sleep``),
so liveness comes from the same ``status.json`` + ``os.killpg`` checks the server uses.
"""

from __future__ import annotations

import json

import pytest

from engine.run import rundir
from engine.run.config import RunConfig
from queue_fixtures import FakeSpawn, model_dir, spawn  # noqa: F401 - fixtures
from webui.runs import QUEUE, Device, RunError, RunManager

CPU = [Device("cpu", "CPU")]
GPUS = [Device("0", "GPU 0"), Device("1", "GPU 1")]




def _cfg(model_dir, devices="") -> RunConfig:
    cfg = RunConfig()
    cfg.model.path = str(model_dir)
    cfg.distributed.devices = devices
    if devices:
        cfg.distributed.num_processes = len(devices.split(","))
    return cfg


def _manager(tmp_path, spawn, devices=CPU) -> RunManager:
    return RunManager(tmp_path / "ws", devices=devices, spawn=spawn)


def test_second_start_on_busy_cpu_is_queued_and_starts_when_the_first_ends(tmp_path, model_dir, spawn):
    m = _manager(tmp_path, spawn)
    first = m.start(_cfg(model_dir))
    assert not first.queued and spawn.spawned == [first.id]
    second = m.start(_cfg(model_dir))
    assert second.queued and second.waiting_for == [first.id]
    assert rundir.read_status(second.run_dir).state == "queued"
    assert (second.run_dir / QUEUE).is_file()
    assert m.info(second.run_dir).queue_position == 1
    assert m.tick() == [] and spawn.spawned == [first.id]  # still busy
    spawn.finish(first.id)
    assert m.tick() == [second.run_dir]
    assert spawn.spawned == [first.id, second.id]
    assert not (second.run_dir / QUEUE).exists()
    assert m.tick() == []  # spawned once


def test_a_crashed_run_frees_its_devices(tmp_path, model_dir, spawn):
    m = _manager(tmp_path, spawn)
    first = m.start(_cfg(model_dir))
    second = m.start(_cfg(model_dir))
    spawn.kill(first.id)  # status.json still says running, but the process group is gone
    assert m.tick() == [second.run_dir]
    assert rundir.read_status(first.run_dir).state == "failed"


def test_restarted_server_reattaches_to_running_and_queued_runs(tmp_path, model_dir, spawn):
    m1 = _manager(tmp_path, spawn)
    first = m1.start(_cfg(model_dir))
    second = m1.start(_cfg(model_dir))
    del m1  # the server stops; the run's process group lives on
    m2 = _manager(tmp_path, spawn)
    runs = {r.id: r for r in m2.runs()}
    assert runs[first.id].state == "running" and runs[second.id].state == "queued"
    assert runs[second.id].queue_position == 1
    assert m2.busy() == {"cpu": first.id}
    assert m2.tick() == []
    spawn.finish(first.id)
    assert m2.tick() == [second.run_dir]


def test_two_servers_never_spawn_one_queued_run_twice(tmp_path, model_dir, spawn):
    a, b = _manager(tmp_path, spawn), _manager(tmp_path, spawn)
    first = a.start(_cfg(model_dir))
    second = a.start(_cfg(model_dir))
    spawn.finish(first.id)
    started = a.tick() + b.tick()
    assert started == [second.run_dir] and spawn.spawned.count(second.id) == 1


def test_runs_from_the_cli_are_never_spawned_by_the_queue(tmp_path, model_dir, spawn):
    from engine.run import launch

    m = _manager(tmp_path, spawn)
    _, run_dir = launch.prepare(_cfg(model_dir), m.workspace)  # what `workbench train` does before spawn
    assert rundir.read_status(run_dir).state == "queued"
    assert m.tick() == [] and spawn.spawned == []


def test_gpu_queue_is_per_device_and_first_in_first_out(tmp_path, model_dir, spawn):
    m = _manager(tmp_path, spawn, GPUS)
    on0 = m.start(_cfg(model_dir, "0"))
    on1 = m.start(_cfg(model_dir, "1"))
    assert not on1.queued  # a different GPU is free
    both = m.start(_cfg(model_dir))  # every visible GPU
    assert both.queued and set(both.waiting_for) == {on0.id, on1.id}
    again0 = m.start(_cfg(model_dir, "0"))
    assert again0.queued and both.id in again0.waiting_for  # behind the earlier request, not around it
    spawn.finish(on0.id)
    assert m.tick() == []  # GPU 0 is free, but the older request for 0+1 waits for GPU 1 and goes first
    spawn.finish(on1.id)
    assert m.tick() == [both.run_dir]
    spawn.finish(both.id)
    assert m.tick() == [again0.run_dir]


def test_stop_cancels_a_queued_run_and_signals_an_active_one(tmp_path, model_dir, spawn):
    m = _manager(tmp_path, spawn)
    first = m.start(_cfg(model_dir))
    second = m.start(_cfg(model_dir))
    assert m.stop(second.id) == "cancelled"
    assert rundir.read_status(second.run_dir).state == "stopped" and not (second.run_dir / QUEUE).exists()
    assert m.stop(first.id) == "stopping"
    spawn.procs[first.id].wait(timeout=10)  # SIGTERM reached the process group
    assert m.stop(second.id) == "stopped"
    spawn.finish(first.id)
    assert m.tick() == []


def test_delete_refuses_active_runs_and_paths_outside_the_workspace(tmp_path, model_dir, spawn):
    m = _manager(tmp_path, spawn)
    run = m.start(_cfg(model_dir))
    with pytest.raises(RunError, match="stop it"):
        m.delete(run.id)
    for bad in ("..", "../x", "/etc", "", "nope"):
        with pytest.raises(RunError):
            m.run_dir(bad)
    spawn.finish(run.id, state="stopped")
    m.delete(run.id)
    assert not run.run_dir.exists() and m.runs() == []


def test_resume_needs_a_checkpoint_of_the_run(tmp_path, model_dir, spawn):
    m = _manager(tmp_path, spawn)
    run = m.start(_cfg(model_dir))
    with pytest.raises(RunError, match="running"):
        m.resume(run.id)
    spawn.finish(run.id, state="stopped")
    with pytest.raises(RunError, match="no checkpoint"):
        m.resume(run.id)
    ckpt = run.run_dir / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    with pytest.raises(RunError, match="not a checkpoint"):
        m.resume(run.id, "../../etc")
    result = m.resume(run.id, "checkpoint-4")
    assert not result.queued and result.run_dir == run.run_dir
    saved = (run.run_dir / "config.yaml").read_text()
    assert f"resume_from: {ckpt}" in saved and spawn.spawned == [run.id, run.id]


def test_info_reports_progress_from_status_and_metrics(tmp_path, model_dir, spawn):
    m = _manager(tmp_path, spawn)
    run = m.start(_cfg(model_dir))
    rundir.append_jsonl(run.run_dir / rundir.METRICS, {"step": 3, "total_steps": 10, "loss": 1.25})
    info = m.info(run.run_dir)
    assert (info.state, info.step, info.total_steps, info.last_loss) == ("running", 3, 10, 1.25)
    assert info.stage == "sft" and info.method == "lora" and info.datasets == ["identity"]
    assert info.devices == ("cpu",)


def test_visible_devices_come_from_nvidia_smi_or_are_the_cpu(tmp_path, monkeypatch):
    from webui.runs import visible_devices

    monkeypatch.setenv("PATH", str(tmp_path))
    assert [(d.id, d.name) for d in visible_devices()] == [("cpu", "CPU")]  # no nvidia-smi at all
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 81559 MiB'\necho '1, NVIDIA H100 80GB HBM3, 81559 MiB'\n")
    smi.chmod(0o755)
    assert [d.id for d in visible_devices()] == ["0", "1"]
    assert visible_devices()[1].name == "GPU 1: NVIDIA H100 80GB HBM3 (81559 MiB)"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert [d.id for d in visible_devices()] == ["cpu"]  # a broken driver is not a GPU
