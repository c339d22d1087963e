"""RunManager: start, stop, queue, re-attach and poll the runs of a workspace. Imports no gradio.

Everything it knows lives in the run directories, so a restarted server knows it too:

* a run is *active* while ``status.json`` says starting/running/stopping and its process
  group is alive (``engine.run.rundir.read_status`` turns a dead one into ``failed``);
* a run is *queued* by the web UI when its devices are busy: ``launch.prepare_run`` writes
  the directory with status ``queued`` and the manager adds a ``queue.json`` marker. A
  background thread (``tick``) spawns queued runs, oldest first, when their devices free up.
  Claiming a run deletes its marker, so two servers on one workspace never spawn it twice;
  runs started by the CLI carry no marker and are never touched.

A run's devices are its ``distributed.devices`` GPU ids, every visible GPU when that is empty,
or ``cpu`` on a machine without GPUs (the CPU counts as one device).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.run import launch, rundir
from engine.run.config import ConfigError, RunConfig, load_config

from .metrics import MetricSeries

QUEUE = "queue.json"
CPU = "cpu"


@dataclass
class Device:
    id: str  # "0", "1", ... or "cpu"
    name: str


def visible_devices() -> list[Device]:
    """The GPUs this machine shows (nvidia-smi, which creates no CUDA context here), or the CPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        gpus = [Device(i.strip(), f"GPU {i.strip()}: {n.strip()} ({m.strip()})")
                for i, n, m in (line.split(",", 2) for line in out.strip().splitlines() if line.count(",") >= 2)]
        if gpus:
            return gpus
    except (OSError, subprocess.SubprocessError):
        pass
    return [Device(CPU, "CPU")]


@dataclass
class RunInfo:
    id: str
    path: Path
    state: str
    stage: str = ""
    method: str = ""
    model: str = ""
    datasets: list[str] = field(default_factory=list)
    step: int = 0
    total_steps: int = 0
    last_loss: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    created_at: float = 0.0
    error: str | None = None
    error_kind: str | None = None
    devices: tuple[str, ...] = ()
    queue_position: int | None = None
    nodes: tuple[str, ...] = ()  # several machines: each node with the slots it runs ("node-a:0,1")
    world_size: int = 1
    warnings: tuple[str, ...] = ()  # status.json: what went wrong without stopping the run (a tracker, the context)


def _node_info(cfg: RunConfig | None) -> dict:
    from engine.run import nodes

    if cfg is None:
        return {}
    try:
        chosen = nodes.selection(cfg.distributed)
    except nodes.NodeError:
        chosen = None
    if chosen is None:
        return {"world_size": cfg.distributed.num_processes}
    return {"nodes": tuple(f"{h}:{','.join(map(str, s))}" for h, s in chosen.items()),
            "world_size": sum(len(s) for s in chosen.values())}


@dataclass
class StartResult:
    run_dir: Path
    queued: bool
    waiting_for: list[str] = field(default_factory=list)  # run ids holding the devices

    @property
    def id(self) -> str:
        return self.run_dir.name


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # already collected (subprocess does it too)


class RunError(ValueError):
    """An action on a run that cannot be done (the message is for the page)."""


class RunManager:
    def __init__(self, workspace: str | Path, devices: list[Device] | None = None,
                 spawn: Callable[[Path], int] = launch.spawn):
        self.workspace = Path(workspace).resolve()
        self.runs_root = self.workspace / "runs"
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.devices = devices if devices is not None else visible_devices()
        self._spawn = spawn
        self._lock = threading.RLock()  # spawn-or-queue decisions
        self._series_lock = threading.Lock()
        self._series: dict[Path, MetricSeries] = {}
        self._configs: dict[Path, tuple[float, RunConfig | None]] = {}
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()

    # ------------------------------------------------------------ lookups

    @property
    def gpus(self) -> list[Device]:
        return [d for d in self.devices if d.id != CPU]

    def run_dir(self, run_id: str) -> Path:
        """The directory of a run id, refusing anything that is not a run of this workspace."""
        if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
            raise RunError(f"'{run_id}' is not a run of this workspace")
        path = self.runs_root / run_id
        if not (path / rundir.CONFIG).is_file():
            raise RunError(f"run '{run_id}' not found in {self.runs_root}")
        return path

    def config(self, run_dir: Path) -> RunConfig | None:
        """The run's config.yaml, parsed once per modification."""
        path = run_dir / rundir.CONFIG
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        cached = self._configs.get(run_dir)
        if cached and cached[0] == mtime:
            return cached[1]
        try:
            cfg = load_config(path)
        except ConfigError:
            cfg = None
        self._configs[run_dir] = (mtime, cfg)
        return cfg

    def run_devices(self, cfg: RunConfig | None) -> set[str]:
        if not self.gpus:
            return {CPU}
        if cfg is not None and cfg.distributed.devices.strip():
            return {d.strip() for d in cfg.distributed.devices.split(",") if d.strip()}
        return {d.id for d in self.gpus}

    def series(self, run_dir: Path) -> MetricSeries:
        """The run's metrics, read incrementally (shared by every open page)."""
        with self._series_lock:
            s = self._series.get(run_dir)
            if s is None:
                s = self._series[run_dir] = MetricSeries(run_dir)
            s.update()
            return s

    def info(self, run_dir: Path, queue: list[Path] | None = None, series: MetricSeries | None = None) -> RunInfo:
        """A run's summary; pass the ``series`` a page is drawing so the numbers and the curve agree."""
        status = rundir.read_status(run_dir) or rundir.Status(state="failed", error="status.json is missing or unreadable")
        cfg = self.config(run_dir)
        series = series or self.series(run_dir)
        queue = self.queue() if queue is None else queue
        return RunInfo(
            id=run_dir.name, path=run_dir, state=status.state,
            stage=cfg.method.stage if cfg else "", method=cfg.method.finetuning_type if cfg else "",
            model=Path(cfg.model.path).name if cfg else "", datasets=[Path(d).name for d in cfg.data.datasets] if cfg else [],
            step=max(status.step, series.latest.get("step", 0) or 0),
            total_steps=status.total_steps or series.latest.get("total_steps", 0) or 0,
            last_loss=series.last_loss(), started_at=status.started_at, ended_at=status.ended_at,
            created_at=(run_dir / rundir.CONFIG).stat().st_ctime if (run_dir / rundir.CONFIG).exists() else 0.0,
            error=status.error, error_kind=status.error_kind, warnings=tuple(status.warnings), devices=tuple(sorted(self.run_devices(cfg))),
            queue_position=queue.index(run_dir) + 1 if run_dir in queue else None,
            **_node_info(cfg),
        )

    def runs(self) -> list[RunInfo]:
        """Every run of the workspace, newest first."""
        queue, out = self.queue(), []
        for p in rundir.list_runs(self.workspace):
            try:
                out.append(self.info(p, queue))
            except (OSError, ValueError) as err:  # one broken run directory is one broken row
                out.append(RunInfo(id=p.name, path=p, state="failed", error_kind="storage",
                                   error=f"the run directory cannot be read: {err}"))
        return out

    def active(self) -> list[Path]:
        out = []
        for p in rundir.list_runs(self.workspace):
            status = rundir.read_status(p)
            if status is not None and status.state in rundir.ACTIVE:
                out.append(p)
        return out

    def busy(self) -> dict[str, str]:
        """device id -> id of the active run that holds it."""
        held = {}
        for p in self.active():
            for d in self.run_devices(self.config(p)):
                held.setdefault(d, p.name)
        return held

    def queue(self) -> list[Path]:
        """Runs waiting for devices, oldest first."""
        items = []
        for p in rundir.list_runs(self.workspace):
            marker = p / QUEUE
            try:
                queued_at = json.loads(marker.read_text(encoding="utf-8")).get("queued_at", 0.0)
            except (OSError, ValueError):
                continue
            status = rundir.read_status_raw(p)
            if status is not None and status.state == "queued":
                items.append((queued_at, p))
        return [p for _, p in sorted(items)]

    # ------------------------------------------------------------ actions

    def start(self, cfg: RunConfig) -> StartResult:
        """Prepare the run directory; spawn now if its devices are free, else queue it."""
        _, run_dir = launch.prepare_run(cfg, self.workspace)  # status 'queued', no marker: no tick touches it
        with self._lock:
            return self._launch_or_queue(run_dir)

    def resume(self, run_id: str, checkpoint: str = "latest") -> StartResult:
        """Continue a stopped or failed run from one of its checkpoints, in the same directory."""
        run_dir = self.run_dir(run_id)
        status = rundir.read_status(run_dir)
        if status is not None and (status.state in rundir.ACTIVE or status.state == "queued"):
            raise RunError(f"run {run_id} is {status.state}; stop it before resuming")
        cfg = load_config(run_dir / rundir.CONFIG)
        if checkpoint != "latest":
            ckpt = run_dir / checkpoint
            if ckpt.parent != run_dir or not rundir._CKPT.match(ckpt.name) or not ckpt.is_dir():
                raise RunError(f"'{checkpoint}' is not a checkpoint of run {run_id}")
            checkpoint = str(ckpt)
        elif rundir.resumable_checkpoint(run_dir) is None:
            broken = ", ".join(p.name for p in rundir.incomplete_checkpoints(run_dir))
            raise RunError(f"run {run_id} has no checkpoint to resume from"
                           + (f" ({broken}: incomplete saves, delete them)" if broken else ""))
        cfg.training.resume_from = checkpoint
        cfg.output.run_dir = str(run_dir)
        _, run_dir = launch.prepare_run(cfg, self.workspace)  # may wait for the stopped run's processes to exit
        with self._lock:
            return self._launch_or_queue(run_dir)

    def _launch_or_queue(self, run_dir: Path) -> StartResult:
        need = self.run_devices(self.config(run_dir))
        busy = self.busy()
        waiting = self.queue()
        holders = sorted({busy[d] for d in need if d in busy})
        ahead = [q.name for q in waiting if self.run_devices(self.config(q)) & need]
        if holders or ahead:
            (run_dir / QUEUE).write_text(json.dumps({"queued_at": time.time(), "devices": sorted(need)}), encoding="utf-8")
            return StartResult(run_dir, queued=True, waiting_for=holders + ahead)
        self._started(self._spawn(run_dir))
        return StartResult(run_dir, queued=False)

    def _started(self, pid) -> None:
        """Reap the new supervisor the moment it exits: as an unreaped zombie child of this server it would
        keep its process group 'alive' to os.killpg(pgid, 0), and the run would look active for ever."""
        if isinstance(pid, int):
            threading.Thread(target=_reap, args=(pid,), name=f"reap-{pid}", daemon=True).start()

    def stop(self, run_id: str, force: bool = False) -> str:
        """'stopping' (signal sent), 'cancelled' (removed from the queue) or the state it already had."""
        run_dir = self.run_dir(run_id)
        with self._lock:
            status = rundir.read_status(run_dir)
            if status is None:
                raise RunError(f"run {run_id} has no readable status.json")
            if status.state == "queued":
                (run_dir / QUEUE).unlink(missing_ok=True)
                rundir.update_status(run_dir, state="stopped", ended_at=time.time(), note="cancelled while queued")
                return "cancelled"
            if status.state not in rundir.ACTIVE:
                return status.state
            launch.stop(run_dir, force=force)
            return "stopping"

    def delete(self, run_id: str) -> None:
        run_dir = self.run_dir(run_id)
        with self._lock:
            status = rundir.read_status(run_dir)
            if status is not None and status.state in rundir.ACTIVE:
                raise RunError(f"run {run_id} is {status.state}; stop it before deleting")
            if run_dir.resolve().parent != self.runs_root.resolve():
                raise RunError(f"refusing to delete {run_dir}: not inside {self.runs_root}")
            shutil.rmtree(run_dir)
            self._series.pop(run_dir, None)
            self._configs.pop(run_dir, None)

    def tick(self) -> list[Path]:
        """Spawn the queued runs whose devices are free (oldest first, never jumping the queue)."""
        started = []
        with self._lock:
            reserved = set(self.busy())
            for run_dir in self.queue():
                need = self.run_devices(self.config(run_dir))
                if need & reserved:
                    reserved |= need  # later runs that need these devices wait behind this one
                    continue
                try:
                    (run_dir / QUEUE).unlink()  # the claim: only one process gets to delete it
                except FileNotFoundError:
                    continue
                reserved |= need
                try:
                    self._started(self._spawn(run_dir))
                except Exception as err:  # noqa: BLE001 - the run shows why it could not start
                    rundir.update_status(run_dir, state="failed", ended_at=time.time(),
                                         error=f"could not start: {err}", error_kind="launcher")
                    continue
                started.append(run_dir)
        return started

    # ------------------------------------------------------------ the background queue

    def start_background(self, interval: float = 1.0) -> None:
        if self._thread is not None:
            return

        def loop():
            while not self._stop_event.wait(interval):
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - keep the queue alive; the next tick retries
                    pass

        self._thread = threading.Thread(target=loop, name="workbench-queue", daemon=True)
        self._thread.start()

    def stop_background(self) -> None:
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None
