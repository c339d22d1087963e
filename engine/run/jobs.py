"""Evaluation and export jobs: a job directory with the run-directory contract, started by launch.spawn.

Layout of ``<job_dir>`` (workspace/evals/<id> or workspace/exports/<id>)::

    config.yaml    the resolved EvalConfig / ExportConfig
    status.json    rundir.Status, replaced atomically; step/total_steps is the progress, ``phase`` says what runs
    metrics.jsonl  progress and result rows, appended
    train.log      the job's stdout and stderr
    result.json    the job's results (written once, at the end)

``run_job`` is the job-side half: it wraps the job's function with status, SIGTERM and error
reporting, so ``engine.jobs.evaluate`` and ``engine.jobs.export`` stay thin. Imports no torch.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from engine.run import launch, rundir
from engine.run.config import ConfigError, dump_config
from engine.run.jobconfig import SCHEMAS, load_job_config

RESULT = "result.json"
JOB_DIRS = {"eval": "evals", "export": "exports"}


class JobStopped(Exception):
    """Raised in the job when it is asked to stop (SIGTERM)."""


def _job_dir_field(kind: str) -> str:
    return "output.dir" if kind == "eval" else "output.job_dir"


def _get_job_dir(kind: str, cfg) -> str:
    return cfg.output.dir if kind == "eval" else cfg.output.job_dir


def job_root(kind: str, workspace: str | Path | None = None) -> Path:
    return launch.workspace_dir(workspace) / JOB_DIRS[kind]


def new_job_dir(kind: str, workspace: str | Path | None = None) -> Path:
    return launch.unique_dir(job_root(kind, workspace), kind)


def prepare_job(kind: str, cfg, workspace: str | Path | None = None, checks: Callable | None = None) -> tuple[object, Path]:
    """Validate (``checks(cfg) -> problems``), create the job directory, write config.yaml and a queued status."""
    cfg = SCHEMAS[kind].model_validate(cfg.model_dump())
    job_dir = Path(_get_job_dir(kind, cfg) or new_job_dir(kind, workspace)).expanduser().resolve()
    if kind == "eval":
        cfg.output.dir = str(job_dir)
    else:
        cfg.output.job_dir = str(job_dir)
    problems = list(checks(cfg) if checks else [])
    if job_dir.exists() and any(job_dir.iterdir()):
        status = rundir.read_status(job_dir)
        if status is not None and status.state in rundir.ACTIVE:
            problems.append((_job_dir_field(kind), f"{job_dir} is still {status.state} (pid {status.pid})"))
        elif not cfg.output.overwrite:
            problems.append((_job_dir_field(kind), f"{job_dir} already exists and is not empty; choose another directory "
                                                   "or set output.overwrite=true"))
    if problems:
        raise ConfigError(problems)
    job_dir.mkdir(parents=True, exist_ok=True)
    for name in (rundir.METRICS, RESULT, rundir.LOG):
        (job_dir / name).unlink(missing_ok=True)
    dump_config(cfg, job_dir / rundir.CONFIG)
    rundir.write_status(job_dir, rundir.Status(state="queued", kind=kind))
    return cfg, job_dir


def start_job(kind: str, cfg, workspace: str | Path | None = None, checks: Callable | None = None) -> Path:
    _, job_dir = prepare_job(kind, cfg, workspace, checks)
    launch.spawn(job_dir, kind)
    return job_dir


def write_result(job_dir: str | Path, result: dict) -> None:
    rundir.atomic_write(Path(job_dir) / RESULT, json.dumps(result, ensure_ascii=False, indent=1, default=str))


def read_result(job_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(job_dir) / RESULT).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def list_jobs(kind: str, workspace: str | Path | None = None) -> list[Path]:
    root = job_root(kind, workspace)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if (p / rundir.CONFIG).is_file()), key=lambda p: p.stat().st_mtime, reverse=True)


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
    """``python -m engine.<job> JOB_DIR/config.yaml``: body(cfg, job_dir, progress) -> result dict."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        print(f"usage: python -m engine.{'evaluate' if kind == 'eval' else kind} JOB_DIR/config.yaml", file=sys.stderr)
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
        kind_, message = classify(err)
        rundir.update_status(job_dir, state="failed", ended_at=time.time(), error=message, error_kind=kind_)
        print(f"[workbench] job failed ({kind_}): {message}", flush=True)
        return 1


def classify(err: BaseException) -> tuple[str, str]:
    from engine.run.checkpoint import CheckpointError
    from engine.train.entry import classify as classify_train

    if isinstance(err, CheckpointError):
        return "config", f"{err.field}: {err}" if err.field else str(err)
    if type(err).__name__ in ("ExportError", "BenchmarkError", "HubError"):
        return type(err).__name__.removesuffix("Error").lower(), str(err)
    return classify_train(err)
