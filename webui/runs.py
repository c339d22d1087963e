"""RunManager: the web UI's view of a workspace's jobs (runs, evaluations, exports). Imports no gradio.

Everything it knows lives in the job directories, so a restarted server knows it too. Starting,
queueing and the device bookkeeping are the workspace's device queue (``engine.run.queue``): a
Start while the devices are busy writes the job with status ``queued`` and a ``queue.json`` marker,
and the server's background thread (``tick``) starts it when its devices free up. Every run the
page starts lives in the workspace (``runs/``).
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.run import jobs, launch, rundir
from engine.run.config import ConfigError, RunConfig, load_config
from engine.run.stages import batch_fill
from engine.run.queue import CPU, QUEUE, Device, DeviceQueue, label, visible_devices  # noqa: F401 - the UI's names for them

from .metrics import MetricSeries


@dataclass
class RunInfo:
    id: str
    path: Path
    state: str
    kind: str = "train"
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
    batch: tuple[str, int] | None = None  # what fills a training batch: ("tokens", 2048) or ("examples", 4)


def _node_info(cfg: RunConfig | None) -> dict:
    from engine.run import nodes

    if not isinstance(cfg, RunConfig):  # an eval or export job runs on this machine
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


class RunError(ValueError):
    """An action on a run that cannot be done (the message is for the page)."""


class RunManager:
    def __init__(self, workspace: str | Path, devices: list[Device] | None = None,
                 spawn: Callable[[Path], int] | None = None):
        self.workspace = Path(workspace).resolve()
        self.runs_root = self.workspace / "runs"
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.devices_queue = DeviceQueue(self.workspace, devices, spawn)
        self.devices = self.devices_queue.devices
        self._series_lock = threading.Lock()
        self._series: dict[Path, MetricSeries] = {}
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()

    # ------------------------------------------------------------ lookups

    @property
    def gpus(self) -> list[Device]:
        return self.devices_queue.gpus

    def run_dir(self, run_id: str) -> Path:
        """The directory of a job id (a run, evaluation or export), refusing anything that is not a job of this workspace."""
        if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
            raise RunError(f"'{run_id}' is not a run of this workspace")
        for kind in jobs.KINDS:
            path = jobs.job_root(kind, self.workspace) / run_id
            if (path / rundir.CONFIG).is_file():
                return path
        raise RunError(f"run '{run_id}' not found in {self.runs_root}")

    def config(self, run_dir: Path):
        """The job's config.yaml, parsed once per modification."""
        return self.devices_queue.config(run_dir)

    def run_devices(self, cfg) -> set[str]:
        """The labels of the devices a job takes (``0``, ``cpu``; ``node-b:1`` on another node)."""
        return {label(d) for d in self.devices_queue.needs(cfg)}

    def series(self, run_dir: Path) -> MetricSeries:
        """The run's metrics, read incrementally (shared by every open page)."""
        with self._series_lock:
            s = self._series.get(run_dir)
            if s is None:
                s = self._series[run_dir] = MetricSeries(run_dir)
            s.update()
            return s

    def info(self, run_dir: Path, queue: list[Path] | None = None, series: MetricSeries | None = None) -> RunInfo:
        """A job's summary; pass the ``series`` a page is drawing so the numbers and the curve agree."""
        status = rundir.read_status(run_dir) or rundir.Status(state="failed", error="status.json is missing or unreadable")
        cfg = self.config(run_dir)
        kind = jobs.kind_of(run_dir)
        series = series or self.series(run_dir)
        queue = self.queue() if queue is None else queue
        stage = method = model = ""
        datasets: list[str] = []
        batch = None
        if isinstance(cfg, RunConfig):
            stage, method, model = cfg.method.stage, cfg.method.finetuning_type, Path(cfg.model.path).name
            datasets = [Path(d).name for d in cfg.data.datasets]
            batch = batch_fill(cfg)
        elif kind == "eval" and cfg is not None:
            model = ", ".join(Path(c).parent.name + "/" + Path(c).name for c in cfg.model.checkpoints) or Path(cfg.model.base).name
            datasets = [Path(d).name for d in cfg.data.datasets]
        elif kind == "export" and cfg is not None:
            model = Path(cfg.model.checkpoint).parent.name + "/" + Path(cfg.model.checkpoint).name
        return RunInfo(
            id=run_dir.name, path=run_dir, state=status.state, kind=kind, stage=stage, method=method, model=model,
            datasets=datasets, step=max(status.step, series.latest.get("step", 0) or 0),
            total_steps=status.total_steps or series.latest.get("total_steps", 0) or 0,
            last_loss=series.last_loss(), started_at=status.started_at, ended_at=status.ended_at,
            created_at=(run_dir / rundir.CONFIG).stat().st_ctime if (run_dir / rundir.CONFIG).exists() else 0.0,
            error=status.error, error_kind=status.error_kind, warnings=tuple(status.warnings), devices=tuple(sorted(self.run_devices(cfg))),
            queue_position=queue.index(run_dir) + 1 if run_dir in queue else None,
            batch=batch,
            **_node_info(cfg),
        )

    def runs(self, kind: str | None = "train") -> list[RunInfo]:
        """Every job of one kind (training runs by default; every kind with None) of the workspace, newest first."""
        queue, out = self.queue(), []
        for p in jobs.list_jobs(kind, self.workspace):
            try:
                out.append(self.info(p, queue))
            except (OSError, ValueError) as err:  # one broken run directory is one broken row
                out.append(RunInfo(id=p.name, path=p, state="failed", error_kind="storage",
                                   error=f"the run directory cannot be read: {err}"))
        return out

    def active(self) -> list[Path]:
        return self.devices_queue.active()

    def busy(self) -> dict[str, str]:
        """device id -> name of the job (or the chat worker's reservation) that holds it."""
        return self.devices_queue.busy()

    def queue(self) -> list[Path]:
        """Jobs waiting for devices, oldest first."""
        return self.devices_queue.waiting()

    # ------------------------------------------------------------ actions

    def start(self, cfg: RunConfig) -> StartResult:
        """Prepare the run directory (always in the workspace); spawn now if its devices are free, else queue it."""
        if cfg.output.run_dir:
            inside = Path(cfg.output.run_dir).expanduser().resolve()
            if not inside.is_relative_to(self.workspace):
                raise ConfigError([("output.run_dir", f"{inside} is outside the workspace {self.workspace}; every run "
                                                      "started here lives in the workspace, so leave the run directory "
                                                      "empty or choose one inside it")])
        return self.submit(cfg)

    def submit(self, cfg) -> StartResult:
        """Prepare a job of any kind in this workspace and start or queue it on the device queue."""
        _, run_dir = launch.prepare(cfg, self.workspace)  # status 'queued', no marker yet: no tick touches it
        done = self.devices_queue.submit(run_dir)
        return StartResult(done.job_dir, done.queued, done.waiting_for)

    def resume(self, run_id: str, checkpoint: str = "latest") -> StartResult:
        """Continue a stopped or failed run from one of its checkpoints, in the same directory."""
        run_dir = self.run_dir(run_id)
        status = rundir.read_status(run_dir)
        if status is not None and (status.state in rundir.ACTIVE or status.state == "queued"):
            raise RunError(f"run {run_id} is {status.state}; stop it before resuming")
        if jobs.kind_of(run_dir) != "train":
            raise RunError(f"{run_id} is not a training run; only runs resume")
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
        return self.submit(cfg)  # prepare may wait for the stopped run's processes to exit

    def stop(self, run_id: str, force: bool = False) -> str:
        """'stopping' (signal sent), 'cancelled' (removed from the queue) or the state it already had."""
        run_dir = self.run_dir(run_id)
        status = rundir.read_status(run_dir)
        if status is None:
            raise RunError(f"run {run_id} has no readable status.json")
        if status.state == "queued" and self.devices_queue.cancel(run_dir):
            return "cancelled"
        status = rundir.read_status(run_dir)
        if status.state not in rundir.ACTIVE:
            return status.state
        launch.stop(run_dir, force=force)
        return "stopping"

    def delete(self, run_id: str) -> None:
        run_dir = self.run_dir(run_id)
        with self.devices_queue.locked():
            status = rundir.read_status(run_dir)
            if status is not None and status.state in rundir.ACTIVE:
                raise RunError(f"run {run_id} is {status.state}; stop it before deleting")
            if not run_dir.resolve().is_relative_to(self.workspace):
                raise RunError(f"refusing to delete {run_dir}: not inside {self.workspace}")
            shutil.rmtree(run_dir)
            self._series.pop(run_dir, None)

    def tick(self) -> list[Path]:
        """Spawn the queued jobs whose devices are free (oldest first, never jumping the queue)."""
        return self.devices_queue.tick()

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
