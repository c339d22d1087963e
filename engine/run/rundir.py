"""The run directory: the only channel from the engine back to the UI and the CLI.

Layout of ``<run_dir>``::

    config.yaml      the resolved RunConfig
    status.json      one Status object, replaced atomically (temp file + os.replace)
    metrics.jsonl    one JSON object per log or eval step, only ever appended
    train.log        stdout and stderr of every process of the run
    checkpoint-<N>/  adapter or weights, tokenizer + chat template, run config, trainer state
    final/           the final weights (same layout as a checkpoint)
    tmp-<name>/      a checkpoint or final/ being written; renamed into place when complete, so one that
                     outlives its run is an incomplete save (reported on resume, left for the user to delete)
    tensorboard/     TensorBoard event files, when training.report_to has tensorboard (wandb/, mlruns/ likewise)

This module imports no torch.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

State = Literal["queued", "starting", "running", "stopping", "completed", "failed", "stopped"]
ACTIVE = ("starting", "running", "stopping")

CONFIG = "config.yaml"
STATUS = "status.json"
METRICS = "metrics.jsonl"
LOG = "train.log"
FINAL = "final"
STAGING = "tmp-"
TRAINER_STATE = "trainer_state.json"
TENSORBOARD = "tensorboard"  # training.report_to tensorboard: the event files
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class Status(BaseModel):
    model_config = ConfigDict(extra="allow")

    state: State = "queued"
    pid: int | None = None
    pgid: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    step: int = 0
    total_steps: int = 0
    error: str | None = None
    error_kind: str | None = None
    warnings: list[str] = []  # problems that did not stop the run (a tracker that failed, an untrained context)


def atomic_write(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(staged: str | Path, target: str | Path) -> None:
    """Rename the complete directory ``staged`` to ``target``; an older ``target`` is moved aside first and removed
    only once the new one is in place, so ``target`` is at every moment either the old or the new, whole."""
    staged, target = Path(staged), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f"{STAGING}old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_status(run_dir: str | Path, status: Status) -> None:
    atomic_write(Path(run_dir) / STATUS, status.model_dump_json(indent=1))


def update_status(run_dir: str | Path, **changes: Any) -> Status:
    """Read, change and atomically replace ``status.json``."""
    status = read_status_raw(run_dir) or Status()
    status = status.model_copy(update=changes)
    write_status(run_dir, status)
    return status


def read_status_raw(run_dir: str | Path) -> Status | None:
    path = Path(run_dir) / STATUS
    try:
        return Status.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, half-replaced or unreadable
        return None


def group_alive(pgid: int | None) -> bool:
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(run_dir: str | Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    path = Path(run_dir) / LOG
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def guess_error(run_dir: str | Path) -> str:
    """The most telling line of a log whose process died without reporting."""
    tail = log_tail(run_dir, lines=200).splitlines()
    for line in reversed(tail):
        if line.startswith("[workbench] run failed"):
            return line.split(": ", 1)[-1][-500:]
    if not writable(run_dir):
        return f"the run directory {run_dir} is not writable (disk full, permissions or a removed mount?)"
    for line in reversed(tail):
        s = line.strip()
        if re.search(r"(Error|Exception|Killed|out of memory)\b", s) and not s.startswith("File "):
            return s[-500:]
    return "the run's processes ended without reporting a result (killed?); see train.log"


def writable(run_dir: str | Path) -> bool:
    """Whether files can be created in ``run_dir`` (asked of the kernel: read-only mounts, immutable or
    permission-denied directories read as not writable; nothing is written)."""
    return os.access(run_dir, os.W_OK | os.X_OK)


def read_status(run_dir: str | Path) -> Status | None:
    """Status with liveness reconciled, never written: an active run whose process group is gone reads as failed
    (or stopped, when it was stopping), with the cause from train.log."""
    status = read_status_raw(run_dir)
    if status is None or status.state not in ACTIVE or group_alive(status.pgid):
        return status
    status = read_status_raw(run_dir)  # it may have finished while we looked
    if status is None or status.state not in ACTIVE or group_alive(status.pgid):
        return status
    ended = status.ended_at or _last_write(run_dir)
    if status.state == "stopping":  # a stop the supervisor could not record (it was killed too)
        return status.model_copy(update={"state": "stopped", "ended_at": ended})
    return status.model_copy(update={"state": "failed", "ended_at": ended, "error": status.error or guess_error(run_dir),
                                     "error_kind": status.error_kind or "killed"})


def _last_write(run_dir: str | Path) -> float:
    times = []
    for name in (STATUS, LOG, METRICS):
        try:
            times.append((Path(run_dir) / name).stat().st_mtime)
        except OSError:
            continue
    return max(times, default=time.time())


_STORAGE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def classify(err: BaseException) -> tuple[str, str]:
    """(kind, one-line message) for status.json, for every job kind."""
    from engine.data.errors import DataError
    from engine.run.checkpoint import CheckpointError
    from engine.run.config import ConfigError

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, ConfigError):
        return "config", str(err)
    if isinstance(err, CheckpointError):
        return "config", f"{err.field}: {err}" if err.field else str(err)
    if isinstance(err, DataError):
        return "data", text
    if type(err).__name__ == "TemplateError":
        return "config", text
    if type(err).__name__ in ("ExportError", "BenchmarkError", "HubError"):
        return type(err).__name__.removesuffix("Error").lower(), str(err)
    if isinstance(err, OSError) and err.errno in _STORAGE_ERRORS:
        return "storage", (f"cannot write {err.filename or 'to the run directory'}: {err.strerror} (a full disk, "
                           "changed permissions or a removed mount?)")
    if "out of memory" in str(err).lower() or type(err).__name__ in ("OutOfMemoryError", "MemoryError"):
        return "out_of_memory", f"out of memory: {text} (lower the batch size or cutoff_len, or use QLoRA / gradient checkpointing)"
    return "runtime", f"{type(err).__name__}: {text}"


def signal_run(run_dir: str | Path, sig: int = signal.SIGTERM) -> bool:
    status = read_status_raw(run_dir)
    if status is None or not group_alive(status.pgid):
        return False
    os.killpg(status.pgid, sig)
    return True


# ---------------------------------------------------------------- metrics.jsonl

def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, ensure_ascii=False, default=float) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


class JsonlTail:
    """Reads new complete lines of a JSONL file from a byte offset (half-written lines wait)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        rows = []
        for line in data[: end + 1].splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return JsonlTail(Path(run_dir) / METRICS).read_new()


# ---------------------------------------------------------------- checkpoints

def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``checkpoint-N`` in the run, oldest first."""
    out = []
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _CKPT.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resumable_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (one with its trainer_state.json): what ``resume_from=latest`` means."""
    for _, path in reversed(checkpoints(run_dir)):
        if (path / TRAINER_STATE).is_file():
            return path
    return None


def incomplete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Saves that did not finish: ``tmp-*`` directories, and checkpoint-N without trainer_state.json newer
    than the newest complete one (left by a save killed before this version wrote through tmp-)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    latest = resumable_checkpoint(run_dir)
    newest = int(latest.name.split("-")[1]) if latest else -1
    out = [p for p in sorted(run_dir.iterdir()) if p.name.startswith(STAGING) and p.is_dir()]
    return out + [p for step, p in checkpoints(run_dir) if step > newest and not (p / TRAINER_STATE).is_file()]


def list_runs(workspace: str | Path) -> list[Path]:
    root = Path(workspace) / "runs"
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / CONFIG).is_file()]
    return sorted(runs, key=_mtime, reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed while listing
        return 0.0
