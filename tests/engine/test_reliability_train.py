"""Issue 13, item 2: nothing lost by a resume or a checkpoint write, no run wedged by its run directory.

Real DeepSpeed-launched runs on the tiny model: resuming a completed run, a kill during a checkpoint save,
a run directory that stops being writable mid-run.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from engine.run import launch, rundir
from engine.run.config import ConfigError, RunConfig
from webui.runs import RunManager

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tiny_model, run_dir, **training) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"path": str(tiny_model)},
        "data": {"datasets": ["identity"], "registry": str(ROOT / "data" / "dataset_info.yaml"), "cutoff_len": 128},
        "training": {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 2e-3, "save_steps": 2,
                     "logging_steps": 1, "precision": "fp32", **training},
        "output": {"run_dir": str(run_dir)},
    })


def _resume(run_dir, **training) -> RunConfig:
    cfg = RunConfig.model_validate(yaml.safe_load((run_dir / rundir.CONFIG).read_text()))
    cfg.training.resume_from = "latest"
    for key, value in training.items():
        setattr(cfg.training, key, value)
    return cfg


def _finish(run_dir, state="completed", timeout=300):
    status = launch.wait(run_dir, timeout=timeout)
    assert status is not None and status.state == state, (status, rundir.log_tail(run_dir))
    return status


def _wait_for(predicate, what, run_dir, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} never happened: {rundir.log_tail(run_dir)}")


@pytest.mark.slow
def test_completed_run_is_refused_unless_max_steps_is_raised(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    launch.start(_cfg(tiny_model, run_dir))
    _finish(run_dir)
    final_weights = (run_dir / "final" / "adapter_model.safetensors").read_bytes()

    with pytest.raises(ConfigError) as err:  # before: trained step 5 of 4 and rewrote final/
        launch.start(_resume(run_dir))
    assert err.value.problems[0][0] == "training.resume_from" and "already trained 4 steps" in str(err.value)
    assert [s for s, _ in rundir.checkpoints(run_dir)] == [2, 4]
    assert (run_dir / "final" / "adapter_model.safetensors").read_bytes() == final_weights

    launch.start(_resume(run_dir, max_steps=6))
    status = _finish(run_dir)
    assert status.step == 6 and [s for s, _ in rundir.checkpoints(run_dir)] == [2, 4, 6]
    # the earlier final's weights stay in checkpoint-4; final/ is step 6, written through tmp-final
    assert (run_dir / "checkpoint-4" / "adapter_model.safetensors").read_bytes() == final_weights
    assert (run_dir / "final" / "adapter_model.safetensors").read_bytes() != final_weights
    assert (run_dir / "final" / rundir.CONFIG).is_file() and not list(run_dir.glob(f"{rundir.STAGING}*"))


SLOW_RENAME = """\
import os, time
_rename = os.rename
def _slow(src, dst, *a, **k):
    if os.environ.get("WB_TEST_SLOW_RENAME") and str(src).endswith(os.environ["WB_TEST_SLOW_RENAME"]):
        time.sleep(120)
    return _rename(src, dst, *a, **k)
os.rename = _slow
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_save_resumes_from_the_last_complete_one(tiny_model, tmp_path, monkeypatch):
    # The save of checkpoint-4 stalls just before its rename (a sitecustomize on the run's PYTHONPATH, so the
    # engine carries no test hook); the whole run is then SIGKILLed mid-save.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_RENAME)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("WB_TEST_SLOW_RENAME", "tmp-checkpoint-4/checkpoint-4")
    run_dir = launch.start(_cfg(tiny_model, tmp_path / "run", max_steps=6))
    staged = run_dir / "tmp-checkpoint-4" / "checkpoint-4"
    _wait_for(lambda: (staged / rundir.CONFIG).is_file(), "the stalled save of checkpoint-4", run_dir)
    assert launch.stop(run_dir, force=True)
    monkeypatch.delenv("WB_TEST_SLOW_RENAME")
    _wait_for(lambda: rundir.read_status(run_dir).state == "failed", "the killed run reading as failed", run_dir, 60)
    assert [s for s, _ in rundir.checkpoints(run_dir)] == [2]  # before: a checkpoint-4 that could not be resumed
    assert rundir.resumable_checkpoint(run_dir).name == "checkpoint-2"
    assert [p.name for p in rundir.incomplete_checkpoints(run_dir)] == ["tmp-checkpoint-4"]
    assert rundir.read_status_raw(run_dir).step >= 2

    launch.start(_resume(run_dir))
    assert rundir.read_status_raw(run_dir).step >= 2  # before: a resume set the step back to 0
    _finish(run_dir)
    log = (run_dir / rundir.LOG).read_text()
    assert "tmp-checkpoint-4 is an incomplete save" in log and "checkpoint-2" in log.split("resuming from")[-1][:300]
    assert [s for s, _ in rundir.checkpoints(run_dir)] == [2, 4, 6] and (run_dir / "final").is_dir()


def _immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True, capture_output=True)


@pytest.fixture
def chattr_works(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed, so a run directory cannot be made unwritable for root")
    try:
        _immutable(probe, True)
    except subprocess.CalledProcessError as err:
        pytest.skip(f"chattr +i is refused here ({err.stderr.decode().strip()}), so a run directory cannot be made "
                    "unwritable for root (root ignores chmod)")
    _immutable(probe, False)


@pytest.mark.slow
def test_run_directory_unwritable_mid_run_reads_as_failed_with_the_cause(tiny_model, tmp_path, chattr_works):
    workspace = tmp_path / "ws"
    run_dir = launch.start(_cfg(tiny_model, workspace / "runs" / "r1", max_steps=200, save_steps=1000))
    _wait_for(lambda: rundir.read_status_raw(run_dir).step >= 2, "step 2", run_dir)
    _immutable(run_dir, True)  # nothing can be created or replaced in it any more: status.json, checkpoints
    try:
        status = _finish(run_dir, state="failed", timeout=120)
        assert status.error_kind in ("storage", "killed") and "cannot write" in status.error, status
        assert "Operation not permitted" in status.error and "\n" not in status.error
        # the supervisor ended without a traceback, and reading the status wrote nothing
        log = (run_dir / rundir.LOG).read_text()
        assert "status.json not updated" in log and "[workbench] run ended: failed" in log
        assert log.count("Traceback") == 1, log  # the trainer's own, printed for the log; none from the supervisor
        assert rundir.read_status_raw(run_dir).state == "running"
        rows = RunManager(workspace, devices=[]).runs()
        assert [(r.id, r.state) for r in rows] == [("r1", "failed")]
    finally:
        _immutable(run_dir, False)


def test_one_broken_run_directory_is_one_broken_row(tmp_path):
    workspace = tmp_path / "ws"
    for name in ("good", "broken"):
        d = workspace / "runs" / name
        d.mkdir(parents=True)
        (d / rundir.CONFIG).write_text("model: {path: /nowhere}\n")
        rundir.write_status(d, rundir.Status(state="completed", step=3))
    (workspace / "runs" / "broken" / rundir.METRICS).mkdir()  # unreadable as a file: IsADirectoryError
    rows = {r.id: r for r in RunManager(workspace, devices=[]).runs()}
    assert rows["good"].state == "completed" and rows["good"].step == 3
    assert rows["broken"].state == "failed" and "cannot be read" in rows["broken"].error
