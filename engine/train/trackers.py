"""Experiment trackers (training.report_to): the trainer's own TensorBoard, W&B and MLflow integrations, with
their files in the run directory, the run config handed to each, and a failure that warns instead of failing.

The trainer makes the integration callbacks from ``TrainingArguments.report_to``; ``guard_trackers`` wraps each one
so an exception in a tracker (a full disk, a lost connection) is written to train.log and status.json once and that
tracker is switched off, while training goes on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers import TrainerCallback

from engine.run import rundir

log = logging.getLogger("engine.train.trackers")

TENSORBOARD_DIR = rundir.TENSORBOARD
MLFLOW_DIR = "mlruns"
PROJECT = "workbench"
_EVENTS = [name for name in vars(TrainerCallback) if name.startswith("on_")]


def tracker_env(run_dir: Path) -> None:
    """Where each tracker writes unless the user's environment says otherwise: inside the run directory."""
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / TENSORBOARD_DIR))
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    os.environ.setdefault("WANDB_PROJECT", PROJECT)
    if "MLFLOW_TRACKING_URI" not in os.environ:  # MLflow 3 keeps its file store only on request
        os.environ["MLFLOW_TRACKING_URI"] = (run_dir / MLFLOW_DIR).resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", PROJECT)


def _flatten(config: dict) -> dict[str, str]:
    return {f"workbench.{section}.{k}": str(v) for section, fields in config.items() for k, v in fields.items()}


def _send_config(callback, config: dict, text: str) -> None:
    """The whole run config to the tracker, next to the TrainingArguments the integration logs itself."""
    name = type(callback).__name__
    if name == "TensorBoardCallback" and getattr(callback, "tb_writer", None) is not None:
        callback.tb_writer.add_text("workbench_config", f"```yaml\n{text}\n```")
    elif name == "WandbCallback" and getattr(callback._wandb, "run", None) is not None:
        callback._wandb.config.update({"workbench": config}, allow_val_change=True)
    elif name == "MLflowCallback" and getattr(callback, "_initialized", False):
        callback._ml_flow.log_params(_flatten(config))
        callback._ml_flow.log_text(text, "workbench_config.yaml")


class GuardedTracker(TrainerCallback):
    """One integration callback whose exceptions become a warning; after the first, the tracker is off."""

    def __init__(self, inner, run_dir: Path, config: dict, config_text: str):
        self.inner, self.run_dir, self.config, self.config_text = inner, Path(run_dir), config, config_text
        self.failed = False
        self.name = type(inner).__name__.removesuffix("Callback")

    def _call(self, event: str, args, state, control, **kwargs):
        if self.failed:
            return None
        try:
            result = getattr(self.inner, event)(args, state, control, **kwargs)
            if event == "on_train_begin" and state.is_world_process_zero:
                _send_config(self.inner, self.config, self.config_text)
            return result
        except Exception as err:  # noqa: BLE001 - a tracker never fails the run
            self.failed = True
            text = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            message = f"tracker {self.name} failed during {event} and is off for the rest of the run: {text}"
            log.warning(message)
            if state.is_world_process_zero:
                status = rundir.read_status_raw(self.run_dir)
                rundir.update_status(self.run_dir, warnings=[*(status.warnings if status else []), message])
            return None


for _event in _EVENTS:
    setattr(GuardedTracker, _event,
            lambda self, args, state, control, _e=_event, **kw: self._call(_e, args, state, control, **kw))


def guard_trackers(trainer, run_dir: Path, config: dict, config_text: str) -> list[GuardedTracker]:
    """Wrap the trainer's tracker callbacks (those made from report_to) in place; returns the wrappers."""
    from transformers.integrations import get_reporting_integration_callbacks

    kinds = tuple(get_reporting_integration_callbacks(list(trainer.args.report_to or [])))
    handler = trainer.callback_handler
    guarded = []
    for i, cb in enumerate(handler.callbacks):
        if kinds and isinstance(cb, kinds):
            handler.callbacks[i] = GuardedTracker(cb, run_dir, config, config_text)
            guarded.append(handler.callbacks[i])
    return guarded
