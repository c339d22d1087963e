"""training.report_to: a tiny run with TensorBoard, W&B (offline) and MLflow (file store) writes the losses of
metrics.jsonl where each tracker's own reader finds them; a tracker that fails warns and the run completes."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from engine.run import rundir
from engine.run.checks import check
from test_train import _cfg, _losses, _run


def _tensorboard_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _wandb_records(path: Path):
    """The records of a W&B run file (.wandb: a LevelDB-style log of protobuf records in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_run(run_dir: Path) -> tuple[dict[int, float], dict]:
    import json

    [run_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    losses, config = {}, {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                losses[int(items["train/global_step"])] = items["train/loss"]
        elif record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
    return losses, config


def _mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "workbench"]
    [run] = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    return {m.step: m.value for m in history}, run


@pytest.mark.slow  # W&B and MLflow start-up: about 2 minutes on 2 shared cores
def test_three_trackers_read_back_the_losses_of_metrics_jsonl(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("TENSORBOARD_LOGGING_DIR", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    cfg = _cfg(tiny_model, tmp_path / "run", training={"max_steps": 3, "save_steps": 3,
                                                         "report_to": ["tensorboard", "wandb", "mlflow"]})
    run_dir = _run(cfg)
    expected = _losses(run_dir)
    assert sorted(expected) == [1, 2, 3]

    tb = _tensorboard_losses(run_dir)
    assert sorted(tb) == [1, 2, 3] and all(tb[s] == pytest.approx(expected[s], rel=1e-5) for s in expected)

    wb, wb_config = _wandb_run(run_dir)
    assert wb == pytest.approx(expected, rel=1e-6)
    assert wb_config["workbench"]["training"]["report_to"] == ["tensorboard", "wandb", "mlflow"]

    ml, ml_run = _mlflow_run(run_dir)
    assert ml == pytest.approx(expected, rel=1e-6)
    assert ml_run.info.run_name == run_dir.name
    assert ml_run.data.params["workbench.training.max_steps"] == "3"
    assert rundir.read_status(run_dir).warnings == []


def test_a_tracker_that_fails_mid_run_warns_and_the_run_completes(tiny_model, tmp_path, monkeypatch):
    # TensorBoard's log directory is a file: its writer fails when the run begins, the run goes on
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(blocker / "tb"))
    cfg = _cfg(tiny_model, tmp_path / "run", training={"max_steps": 2, "save_steps": 2, "report_to": ["tensorboard"]})
    run_dir = _run(cfg)
    assert sorted(_losses(run_dir)) == [1, 2]
    [warning] = rundir.read_status(run_dir).warnings
    assert warning.startswith("tracker TensorBoard failed during on_train_begin")
    assert "tracker TensorBoard failed" in (run_dir / rundir.LOG).read_text()


def test_missing_or_logged_out_tracker_is_refused_in_one_sentence(tiny_model, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = _cfg(tiny_model, tmp_path / "run", training={"report_to": ["wandb", "mlflow"]})
    problems = dict(p for p in check(cfg) if p[0] == "training.report_to")
    messages = [m for f, m in check(cfg) if f == "training.report_to"]
    assert len(messages) == 2, problems
    assert any(m.startswith("wandb logs online but this machine has no W&B login: set WANDB_API_KEY") for m in messages)
    assert any(m.startswith("mlflow is selected but not installed: pip install mlflow") for m in messages)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert [m for f, m in check(cfg) if f == "training.report_to"] == [m for m in messages if m.startswith("mlflow")]
