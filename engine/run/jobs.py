"""One job pipeline: a training run, an evaluation and an export are kinds of one job. Imports no torch.

``KINDS`` is the one table of what differs between kinds; everything else is shared:
``launch.prepare`` (check, create the job directory, write config.yaml and a queued status),
``launch.spawn`` (the supervisor, ``python -m engine.run.launch JOB_DIR``), the file protocol of
``rundir`` (status.json, metrics.jsonl, train.log), the device queue (``engine.run.queue``) and
the CLI shape (``workbench train|eval|export CONFIG [overrides] [--foreground] [--no-queue]``).

Layout of every job directory (``<workspace>/<kind folder>/<id>`` unless the config names one)::

    config.yaml    the resolved config of the kind's schema
    status.json    rundir.Status with ``kind``; step/total_steps is the progress, ``phase`` says what runs
    metrics.jsonl  progress and result rows, appended
    train.log      the job's stdout and stderr
    result.json    eval/export: the job's results (written once, at the end)

``run_job`` is the job-side half of the plain-module kinds: it wraps the job's function with
status, SIGTERM and error reporting, so ``engine.jobs.evaluate`` and ``engine.jobs.export`` stay thin.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from engine.run import rundir
from engine.run.config import RunConfig
from engine.run.config import load_config as load_run_config
from engine.run.jobconfig import EvalConfig, ExportConfig, load_job_config

RESULT = "result.json"
DEFAULT_WORKSPACE = "workspace"


@dataclass(frozen=True)
class JobKind:
    name: str
    module: str        # what the job runs: python -m MODULE JOB_DIR/config.yaml (under the DeepSpeed launcher if deepspeed)
    schema: type       # its config
    checks: str        # "module:function", (cfg, job_dir) -> [(field, message)]; imported when a job is prepared
    folder: str        # where its job directories live under the workspace
    dir_field: str     # the config field that names the job's own directory
    output: str        # where its product goes
    deepspeed: bool = False
    devices: str = "first"  # "config": distributed.devices (empty: every visible GPU); "first": the first visible device

    def job_dir(self, cfg) -> str:
        section, name = self.dir_field.split(".")
        return getattr(getattr(cfg, section), name)

    def set_job_dir(self, cfg, path: Path) -> None:
        section, name = self.dir_field.split(".")
        setattr(getattr(cfg, section), name, str(path))

    def check(self, cfg, job_dir: Path) -> list[tuple[str, str]]:
        module, func = self.checks.split(":")
        return list(getattr(importlib.import_module(module), func)(cfg, job_dir))


KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind("train", "engine.train", RunConfig, "engine.run.checks:check", "runs", "output.run_dir",
            "checkpoint-<N>/ and final/ in the run directory", deepspeed=True, devices="config"),
    JobKind("eval", "engine.jobs.evaluate", EvalConfig, "engine.run.jobchecks:check_eval", "evals", "output.job_dir",
            "result.json in the job directory; predictions in output.dir (empty: the job directory)"),
    JobKind("export", "engine.jobs.export", ExportConfig, "engine.run.jobchecks:check_export", "exports", "output.job_dir",
            "the merged model in output.dir (empty: <job directory>/model)"),
)}


def kind_of_config(cfg) -> JobKind:
    for kind in KINDS.values():
        if isinstance(cfg, kind.schema):
            return kind
    raise TypeError(f"{type(cfg).__name__} is not the config of a job kind")


def kind_of(job_dir: str | Path) -> str:
    """The kind recorded in a job directory's status.json (runs written before kinds existed are training)."""
    status = rundir.read_status_raw(job_dir)
    return getattr(status, "kind", None) or "train" if status is not None else "train"


def load_config(job_dir: str | Path, kind: str | None = None):
    kind = kind or kind_of(job_dir)
    path = Path(job_dir) / rundir.CONFIG
    return load_run_config(path) if kind == "train" else load_job_config(kind, path)


# ---------------------------------------------------------------- the workspace's folders

def workspace_dir(workspace: str | Path | None = None) -> Path:
    return Path(workspace or os.environ.get("WORKBENCH_WORKSPACE") or DEFAULT_WORKSPACE).resolve()


def unique_dir(root: Path, suffix: str) -> Path:
    """``root/<time>-<suffix>``, numbered when that name is taken."""
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-{suffix}"
    path, n = root / stem, 1
    while path.exists():
        n += 1
        path = root / f"{stem}-{n}"
    return path


def job_root(kind: str, workspace: str | Path | None = None) -> Path:
    return workspace_dir(workspace) / KINDS[kind].folder


def new_job_dir(cfg, workspace: str | Path | None = None) -> Path:
    kind = kind_of_config(cfg)
    suffix = f"{cfg.method.stage}-{cfg.method.finetuning_type}" if kind.name == "train" else kind.name
    return unique_dir(job_root(kind.name, workspace), suffix)


def list_jobs(kind: str | None = None, workspace: str | Path | None = None) -> list[Path]:
    """The job directories of one kind (every kind when None) in the workspace, newest first."""
    out = []
    for k in ([kind] if kind else KINDS):
        root = job_root(k, workspace)
        if root.is_dir():
            out += [p for p in root.iterdir() if (p / rundir.CONFIG).is_file()]
    return sorted(out, key=lambda p: p.stat().st_mtime, reverse=True)


def write_result(job_dir: str | Path, result: dict) -> None:
    rundir.atomic_write(Path(job_dir) / RESULT, json.dumps(result, ensure_ascii=False, indent=1, default=str))


def read_result(job_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(job_dir) / RESULT).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


# ---------------------------------------------------------------- the job side (eval, export)

class JobStopped(Exception):
    """Raised in the job when it is asked to stop (SIGTERM)."""


class Progress:
    """Job-side progress: ``status.json`` step/total/phase, and a row in metrics.jsonl per update."""

    def __init__(self, job_dir: Path):
        self.job_dir = job_dir
        self.step = 0
        self.total = 0

    def plan(self, total: int) -> None:
        self.total = total
        rundir.update_status(self.job_dir, total_steps=total)

    def phase(self, text: str) -> None:
        logging.getLogger("engine.run.jobs").info(text)
        rundir.update_status(self.job_dir, phase=text)

    def advance(self, n: int = 1, **row) -> None:
        self.step += n
        rundir.update_status(self.job_dir, step=self.step)
        rundir.append_jsonl(self.job_dir / rundir.METRICS, {"step": self.step, "total_steps": self.total, "time": time.time(), **row})


def _stop(*_):
    raise JobStopped()


def run_job(kind: str, argv: list[str], body: Callable) -> int:
    """``python -m MODULE JOB_DIR/config.yaml``: body(cfg, job_dir, progress) -> result dict."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        print(f"usage: python -m {KINDS[kind].module} JOB_DIR/config.yaml", file=sys.stderr)
        return 2
    config_path = Path(argv[0]).resolve()
    job_dir = config_path.parent
    signal.signal(signal.SIGTERM, _stop)
    try:
        cfg = load_job_config(kind, config_path)
        rundir.update_status(job_dir, state="running", started_at=time.time())
        result = body(cfg, job_dir, Progress(job_dir))
        write_result(job_dir, result)
        rundir.update_status(job_dir, state="completed", ended_at=time.time(), error=None, error_kind=None, phase="done")
        return 0
    except JobStopped:
        rundir.update_status(job_dir, state="stopped", ended_at=time.time())
        print("[workbench] job stopped", flush=True)
        return 0
    except BaseException as err:  # noqa: BLE001 - every failure is reported in status.json
        traceback.print_exc()
        kind_, message = rundir.classify(err)
        rundir.update_status(job_dir, state="failed", ended_at=time.time(), error=message, error_kind=kind_)
        print(f"[workbench] job failed ({kind_}): {message}", flush=True)
        return 1
