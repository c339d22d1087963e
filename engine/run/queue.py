"""The device queue of a workspace: which job holds which device, which wait, and who starts next.

Every job that takes a device goes through it: training runs, evaluations and exports started from
the web UI or the CLI, and the chat worker (a *reservation*). Everything it knows lives in files of
the workspace, so any number of processes (UI servers, ``workbench`` commands) share one queue:

* a job *holds* its devices while its ``status.json`` says starting/running/stopping and its process
  group is alive (``rundir.read_status`` turns a dead one into ``failed``);
* a job *waits* while its status is ``queued`` and its directory holds a ``queue.json`` marker; a job
  prepared without a marker (``launch.prepare`` alone, or ``--no-queue``) is never started by the queue;
* a *reservation* (``<workspace>/reservations/<name>.json``: pid, devices) holds devices for a process
  that is not a job (the chat worker) until it is released, or its pid is gone (stale).

``tick`` starts the waiting jobs, oldest first, whose devices are free; a later job never jumps an
earlier one that needs the same device. Claiming a job deletes its marker, so it starts once however
many processes tick; the decisions are made under a lock file of the workspace. Who ticks: the UI
server (a background thread), ``workbench train|eval|export --foreground`` while it waits, and for a
job queued by the CLI in the background a detached ``python -m engine.run.queue WORKSPACE JOB_DIR``
that ticks until that job has started (so a queued job starts with no UI server running).

Devices are keyed by (host, device). This machine is one host, ``localhost`` (``nodes.LOCAL``: its
loopback names and its own host name all count as it): a job's devices there are its ``distributed.devices``
GPU ids (every visible GPU when empty) for training, and the first visible GPU for the other kinds; on a
machine without GPUs the CPU is one device. A run on several machines holds each node's chosen slots
(``distributed.include``, from the hostfile or ``distributed.nodes``): two runs that share a slot of one node
never run together, and a run on nodes A and B leaves a run on node C free to start. Shown as labels: a
local device by its id (``0``, ``cpu``), another node's slot as ``host:slot``.
Imports no torch and no gradio.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from engine.run import jobs, launch, nodes, rundir
from engine.run.config import ConfigError

QUEUE = "queue.json"
RESERVATIONS = "reservations"
LOCK = ".queue.lock"
CPU = "cpu"
LOCAL = nodes.LOCAL
Slot = tuple[str, str]  # (host, device): nodes.LOCAL or another node's name, and a GPU id / slot or "cpu"


def label(slot: Slot) -> str:
    """How a slot is shown and written: a local device by its id, another node's slot as host:slot."""
    host, device = slot
    return device if host == LOCAL else f"{host}:{device}"


def slot_of(text: str) -> Slot:
    """The slot of a label (``0``, ``cpu``, ``node-b:1``; a name of this machine counts as local)."""
    host, sep, device = str(text).rpartition(":")
    return (nodes.canonical_host(host), device) if sep and host else (LOCAL, str(text))


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
class Submitted:
    job_dir: Path
    queued: bool
    waiting_for: list[str] = field(default_factory=list)  # names of the jobs (or reservations) ahead of it

    @property
    def id(self) -> str:
        return self.job_dir.name


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # already collected (subprocess does it too)


class DeviceQueue:
    def __init__(self, workspace: str | Path, devices: list[Device] | None = None,
                 spawn: Callable[[Path], int] | None = None):
        self.workspace = Path(workspace).resolve()
        self.devices = devices if devices is not None else visible_devices()
        self._spawn = spawn or (lambda job_dir: launch.spawn(job_dir))
        self._lock = threading.RLock()
        self._configs: dict[Path, tuple[float, object]] = {}

    # ------------------------------------------------------------ what holds and needs what

    @property
    def gpus(self) -> list[Device]:
        return [d for d in self.devices if d.id != CPU]

    def config(self, job_dir: Path):
        """The job's config.yaml, parsed once per modification (None when unreadable)."""
        path = job_dir / rundir.CONFIG
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        cached = self._configs.get(job_dir)
        if cached and cached[0] == mtime:
            return cached[1]
        try:
            cfg = jobs.load_config(job_dir)
        except (ConfigError, OSError):
            cfg = None
        self._configs[job_dir] = (mtime, cfg)
        return cfg

    def local(self, ids: set[str] | None = None) -> set[Slot]:
        """Slots of this machine: the given GPU ids (every visible GPU when None), or the CPU where there is no GPU."""
        if not self.gpus:
            return {(LOCAL, CPU)}
        return {(LOCAL, i) for i in (ids if ids else {d.id for d in self.gpus})}

    def needs(self, cfg) -> set[Slot]:
        """The (host, device) slots a job of this config takes."""
        if cfg is None or jobs.kind_of_config(cfg).devices != "config":
            return {(LOCAL, self.gpus[0].id)} if self.gpus else {(LOCAL, CPU)}
        try:
            chosen = nodes.selection(cfg.distributed)
        except nodes.NodeError:
            chosen = None  # the checks refuse such a config; until then it counts as a local run
        if chosen is None:
            return self.local({d.strip() for d in cfg.distributed.devices.split(",") if d.strip()})
        out: set[Slot] = set()
        for host, slots in chosen.items():
            name = nodes.canonical_host(host)
            out |= self.local({str(i) for i in slots}) if name == LOCAL else {(name, str(i)) for i in slots}
        return out

    def job_devices(self, job_dir: Path) -> set[Slot]:
        return self.needs(self.config(job_dir))

    def active(self) -> list[Path]:
        return [p for p in jobs.list_jobs(None, self.workspace)
                if (s := rundir.read_status(p)) is not None and s.state in rundir.ACTIVE]

    def reservations(self) -> dict[str, dict]:
        """name -> record of every live reservation (stale ones, whose pid is gone, are removed)."""
        out = {}
        root = self.workspace / RESERVATIONS
        for path in sorted(root.glob("*.json")) if root.is_dir() else []:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                alive = psutil.pid_exists(int(record["pid"])) and psutil.Process(int(record["pid"])).status() != psutil.STATUS_ZOMBIE
            except (OSError, ValueError, KeyError, TypeError, psutil.Error):
                alive = False
            if alive:
                out[path.stem] = record
            else:
                path.unlink(missing_ok=True)
        return out

    def held(self, jobs_only: bool = False) -> dict[Slot, str]:
        """(host, device) -> name of the job (or reservation) that holds it."""
        held: dict[Slot, str] = {}
        for p in self.active():
            for d in self.job_devices(p):
                held.setdefault(d, p.name)
        if not jobs_only:
            for name, record in self.reservations().items():
                for d in record.get("devices", []):
                    held.setdefault(slot_of(d), name)
        return held

    def busy(self, jobs_only: bool = False) -> dict[str, str]:
        """device label (``0``, ``cpu``, ``node-b:1``) -> name of the job (or reservation) that holds it."""
        return {label(d): name for d, name in self.held(jobs_only).items()}

    def waiting(self) -> list[Path]:
        """Jobs waiting for devices, oldest first."""
        items = []
        for p in jobs.list_jobs(None, self.workspace):
            queued_at = _queued_at(p)
            status = rundir.read_status_raw(p) if queued_at is not None else None
            if status is not None and status.state == "queued":
                items.append((queued_at, p))
        return [p for _, p in sorted(items)]

    # ------------------------------------------------------------ actions

    @contextmanager
    def locked(self):
        """In-process and cross-process exclusion for every spawn-or-queue decision."""
        self.workspace.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.workspace / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def submit(self, job_dir: Path) -> Submitted:
        """Start a prepared job now if its devices are free and nobody waits for them, else queue it (marker)."""
        with self.locked():
            need = self.job_devices(job_dir)
            busy = self.held()
            holders = sorted({busy[d] for d in need if d in busy})
            ahead = [q.name for q in self.waiting() if q != job_dir and self.job_devices(q) & need]
            if holders or ahead:
                (job_dir / QUEUE).write_text(json.dumps({"queued_at": time.time(), "devices": sorted(map(label, need))}),
                                             encoding="utf-8")
                return Submitted(job_dir, queued=True, waiting_for=holders + ahead)
            self._started(self._spawn(job_dir))
            return Submitted(job_dir, queued=False)

    def start_now(self, job_dir: Path) -> None:
        """Start a prepared job whatever holds its devices (``--no-queue``)."""
        with self.locked():
            self._started(self._spawn(job_dir))

    def cancel(self, job_dir: Path) -> bool:
        """Take a waiting job off the queue (it reads as stopped); False when it was not waiting."""
        with self.locked():
            status = rundir.read_status(job_dir)
            if status is None or status.state != "queued":
                return False
            (job_dir / QUEUE).unlink(missing_ok=True)
            rundir.update_status(job_dir, state="stopped", ended_at=time.time(), note="cancelled while queued")
            return True

    def tick(self, extra: Path | None = None) -> list[Path]:
        """Spawn the waiting jobs whose devices are free (oldest first, never jumping the queue).

        ``extra``: a waiting job outside the workspace's folders (a CLI job with its own directory), in line too."""
        started = []
        with self.locked():
            reserved = set(self.held())
            line = self.waiting()
            if extra is not None and extra not in line and _queued_at(extra) is not None:
                line = sorted(line + [extra], key=lambda p: _queued_at(p) or 0.0)
            for job_dir in line:
                need = self.job_devices(job_dir)
                if need & reserved:
                    reserved |= need  # later jobs that need these devices wait behind this one
                    continue
                try:
                    (job_dir / QUEUE).unlink()  # the claim: only one process gets to delete it
                except FileNotFoundError:
                    continue
                reserved |= need
                try:
                    self._started(self._spawn(job_dir))
                except Exception as err:  # noqa: BLE001 - the job shows why it could not start
                    rundir.update_status(job_dir, state="failed", ended_at=time.time(),
                                         error=f"could not start: {err}", error_kind="launcher")
                    continue
                started.append(job_dir)
        return started

    def wait_turn(self, job_dir: Path, poll: float = 1.0) -> rundir.Status | None:
        """Tick until ``job_dir`` has left the queue (started by this or any other process, or cancelled)."""
        while True:
            status = rundir.read_status_raw(job_dir)
            if status is None or status.state != "queued" or not (job_dir / QUEUE).exists():
                return status
            self.tick(extra=job_dir)
            time.sleep(poll)

    def _started(self, pid) -> None:
        """Reap the new supervisor the moment it exits: as an unreaped zombie child of this process it would
        keep its process group 'alive' to os.killpg(pgid, 0), and the job would look active for ever."""
        if isinstance(pid, int):
            threading.Thread(target=_reap, args=(pid,), name=f"reap-{pid}", daemon=True).start()

    # ------------------------------------------------------------ reservations (the chat worker)

    def reserve(self, name: str, pid: int, devices: set[str] | None = None, what: str = "") -> dict:
        """Hold devices (labels; the first visible one by default) for process ``pid`` until ``release`` or its exit."""
        record = {"pid": pid, "devices": sorted(devices or map(label, self.needs(None))), "what": what, "since": time.time()}
        root = self.workspace / RESERVATIONS
        root.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write(root / f"{name}.json", json.dumps(record))
        return record

    def release(self, name: str) -> None:
        (self.workspace / RESERVATIONS / f"{name}.json").unlink(missing_ok=True)


def _queued_at(job_dir: Path) -> float | None:
    try:
        return float(json.loads((job_dir / QUEUE).read_text(encoding="utf-8")).get("queued_at", 0.0))
    except (FileNotFoundError, ValueError, TypeError, AttributeError):
        return None


def start_waiter(workspace: Path, job_dir: Path) -> int:
    """A detached process that ticks the queue until ``job_dir`` has started (a CLI job queued in the background)."""
    log = open(job_dir / rundir.LOG, "ab")
    try:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
        proc = subprocess.Popen([sys.executable, "-m", "engine.run.queue", str(workspace), str(job_dir)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, env=env, cwd=os.getcwd())
    finally:
        log.close()
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc.pid


if __name__ == "__main__":
    queue = DeviceQueue(Path(sys.argv[1]))
    final = queue.wait_turn(Path(sys.argv[2]).resolve())
    print(f"[workbench] left the queue: {final.state if final else 'unknown'}", flush=True)
