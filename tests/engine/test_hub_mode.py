"""The Hub follows the user's environment: offline (HF_HUB_OFFLINE=1) refuses a push before any work; online, the
export job's own process is online too (it reaches for the hub endpoint instead of reporting offline mode)."""

from __future__ import annotations

import pytest

from engine.run import launch, rundir
from engine.run.config import ConfigError
from engine.run.jobconfig import ExportConfig
from test_export import make_adapter


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return make_adapter(tiny_model, tmp_path_factory.mktemp("run") / "checkpoint-2")


def _push_cfg(adapter, tmp_path) -> ExportConfig:
    return ExportConfig.model_validate({
        "model": {"checkpoint": str(adapter)},
        "output": {"dir": str(tmp_path / "out"), "job_dir": str(tmp_path / "job"), "dtype": "float32"},
        "hub": {"repo_id": "me/model", "token": "x", "endpoint": "http://127.0.0.1:9", "timeout_s": 2}})


def test_offline_push_is_refused_before_any_work(adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        launch.start(_push_cfg(adapter, tmp_path))
    assert [f for f, _ in err.value.problems] == ["hub.repo_id"]
    assert "push to me/model is not possible: offline mode is on (HF_HUB_OFFLINE=1" in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "job" / rundir.STATUS).exists()


def test_push_job_process_carries_the_online_setting(adapter, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    job_dir = launch.start(_push_cfg(adapter, tmp_path))
    status = launch.wait(job_dir, timeout=300)
    log = rundir.log_tail(job_dir)
    # online: the push really tries the endpoint (closed port), once; offline mode would have said so instead
    assert status.state == "failed", (status, log)
    assert "push to me/model failed: cannot reach http://127.0.0.1:9" in status.error, status.error
    assert "offline mode" not in status.error
    assert (tmp_path / "out" / "model.safetensors").is_file()  # the export itself is kept
