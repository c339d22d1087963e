"""The one launcher of every job kind (train, eval, export; see ``jobs.KINDS``).

``prepare`` validates the config and creates the job directory (status ``queued``); ``spawn``
starts, in a new process session, ``python -m engine.run.launch JOB_DIR`` (the supervisor),
directly or through the device queue (``engine.run.queue``). The supervisor runs the kind's
module (a training run under the DeepSpeed launcher) with stdout/stderr going to ``train.log``
(never a pipe), waits for the whole process group, and records the exit code in ``status.json``.
Imports no torch.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from engine.run import jobs, nodes, rundir
from engine.run.config import ConfigError, RunConfig, dump_config
from engine.run.jobs import workspace_dir  # noqa: F401 - launch.workspace_dir, as the CLI and the server call it


def _absolute(path: str) -> str:
    """The one rule for a relative path: from the current directory, else from the project (engine.data.registry.find_path,
    as the page and the data tools resolve it)."""
    from engine.data.registry import find_path

    return str(find_path(Path(path).expanduser()).resolve()) if path else path


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Make every path in the config absolute, so the run directory's config.yaml stands alone."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.path = _absolute(cfg.model.path)
    cfg.model.extend_vocab = _absolute(cfg.model.extend_vocab)
    cfg.data.registry = _absolute(cfg.data.registry)
    cfg.method.reward_model = _absolute(cfg.method.reward_model)
    cfg.data.datasets = [_absolute(d) if Path(_absolute(d)).exists() else d for d in cfg.data.datasets]
    if cfg.distributed.hostfile:
        cfg.distributed.hostfile = _absolute(cfg.distributed.hostfile)
    if cfg.training.resume_from and cfg.training.resume_from != "latest":
        cfg.training.resume_from = _absolute(cfg.training.resume_from)
    return cfg


def prepare(cfg, workspace: str | Path | None = None) -> tuple[object, Path]:
    """The one prepare of every job kind: check the config (every problem at once), choose and create the job
    directory, write config.yaml and a queued status that names the kind. Nothing is created for a bad config."""
    kind = jobs.kind_of_config(cfg)
    cfg = resolve_paths(cfg) if kind.name == "train" else kind.schema.model_validate(cfg.model_dump())
    given = kind.job_dir(cfg)
    job_dir = Path(given).expanduser().resolve() if given else jobs.new_job_dir(cfg, workspace)
    kind.set_job_dir(cfg, job_dir)
    problems = kind.check(cfg, job_dir)
    if any(field == kind.dir_field for field, _ in problems):  # a directory that cannot exist: nothing to look at
        raise ConfigError(problems)
    reusing = bool(cfg.training.resume_from) if kind.name == "train" else cfg.output.overwrite
    if job_dir.exists() and any(job_dir.iterdir()):
        status = rundir.read_status(job_dir)
        if reusing and status is not None and status.state not in rundir.ACTIVE:
            _wait_group_exit(status.pgid, timeout=60)  # a stopped job's launcher may still be exiting
        if status is not None and status.state in rundir.ACTIVE:
            problems.append((kind.dir_field, f"{job_dir} is still {status.state} (pid {status.pid}); stop it first"))
        elif not reusing:
            how = ("choose another run directory, or resume it with training.resume_from=latest" if kind.name == "train"
                   else "choose another directory or set output.overwrite=true")
            problems.append((kind.dir_field, f"{job_dir} already exists and is not empty; {how}"))
    if problems:
        raise ConfigError(problems)
    fresh = not job_dir.exists()
    job_dir.mkdir(parents=True, exist_ok=True)
    if kind.name == "train":
        problems = nodes.preflight(cfg, job_dir)  # several machines: ask every node before any compute
        if problems:
            if fresh:
                shutil.rmtree(job_dir, ignore_errors=True)
            raise ConfigError(problems)
        nodes.write_run_files(cfg, job_dir)
    if kind.name != "train":  # a replaced job starts clean (a resumed run keeps its log and metrics)
        for name in (rundir.METRICS, jobs.RESULT, rundir.LOG):
            (job_dir / name).unlink(missing_ok=True)
    dump_config(cfg, job_dir / rundir.CONFIG)
    earlier = rundir.read_status_raw(job_dir) if kind.name == "train" and reusing else None  # a resume keeps its progress
    rundir.write_status(job_dir, rundir.Status(state="queued", kind=kind.name, step=earlier.step if earlier else 0,
                                               total_steps=earlier.total_steps if earlier else 0))
    return cfg, job_dir


def _wait_group_exit(pgid: int | None, timeout: float) -> None:
    deadline = time.time() + timeout
    while rundir.group_alive(pgid) and time.time() < deadline:
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_launcher() -> list[str]:
    script = Path(sys.executable).with_name("deepspeed")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def _local_launch(ranks: list[int], master_port: int) -> list[str]:
    """DeepSpeed's per-node launcher (``deepspeed.launcher.launch``), started directly for a run on this machine:
    the ``deepspeed`` runner only encodes the world (``{"localhost": [device ids]}``) and starts this same command,
    one Python process (importing DeepSpeed and torch: about as long as the launcher itself takes) later. ``--world_info`` is that world as the runner
    passes it: base64 of its JSON. ``engine.run.dslaunch`` runs that launcher as it is, imported without mlflow."""
    world = base64.urlsafe_b64encode(json.dumps({"localhost": ranks}).encode()).decode()
    return [sys.executable, "-u", "-m", "engine.run.dslaunch", "--world_info", world,
            "--master_addr", "127.0.0.1", "--master_port", str(master_port)]


def _multinode(cfg: RunConfig) -> bool:
    try:
        return nodes.selection(cfg.distributed) is not None
    except nodes.NodeError:
        return False  # check() names the problem; a preview still shows a command


def build_command(cfg: RunConfig, run_dir: str | Path, node_rank: int = 0) -> list[str]:
    """The DeepSpeed launcher command for a prepared run (pure: no side effects); node_rank: no_ssh mode's node."""
    d = cfg.distributed
    if _multinode(cfg):
        cmd = _deepspeed_launcher() + nodes.launcher_args(cfg, run_dir, d.master_port or free_port(), node_rank)
        return cmd + ["--no_local_rank", "--module", "engine.train", str(Path(run_dir) / rundir.CONFIG)]
    # devices that are not a list of ids are check()'s to name; a preview still shows a command
    ranks = d.device_ids if d.devices else list(range(d.num_processes))
    cmd = _local_launch(ranks, d.master_port or free_port())
    return cmd + ["--no_local_rank", "--module", "engine.train", str(Path(run_dir) / rundir.CONFIG)]


def start(cfg, workspace: str | Path | None = None) -> Path:
    """Prepare a job of any kind and start it now, in its own process session (no queue). Returns its directory."""
    _, job_dir = prepare(cfg, workspace)
    spawn(job_dir)
    return job_dir


def spawn(job_dir: str | Path) -> int:
    """Start the supervisor of a prepared job (config.yaml written) in a new process session; returns its pid."""
    job_dir = Path(job_dir)
    log = open(job_dir / rundir.LOG, "ab")
    try:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.run.launch", str(job_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=env, cwd=os.getcwd(),
        )
    finally:
        log.close()
    # Reap the supervisor when it ends, or a killed one stays a zombie that still counts as alive.
    threading.Thread(target=proc.wait, daemon=True).start()
    rundir.update_status(job_dir, state="starting", pid=proc.pid, pgid=proc.pid, started_at=time.time(),
                         ended_at=None, exit_code=None, error=None, error_kind=None)
    return proc.pid


def stop(run_dir: str | Path, force: bool = False) -> bool:
    """Ask a run to stop: SIGTERM (finish the step, save, exit) or, with force, SIGKILL."""
    status = rundir.read_status(run_dir)
    if status is None or status.state not in rundir.ACTIVE:
        return False
    if force:  # a killed run reads as failed, as any run whose processes vanish
        killed = rundir.signal_run(run_dir, signal.SIGKILL)
        cfg = _run_config(run_dir)
        if cfg is not None and _multinode(cfg):
            nodes.signal_everywhere(cfg, run_dir)
        return killed
    if status.state != "stopping":
        rundir.update_status(run_dir, state="stopping")
    cfg = _run_config(run_dir)
    if cfg is not None and _multinode(cfg) and cfg.distributed.launcher == "pdsh":
        # its ranks run under ssh, not in this group; none yet (still starting): stop the launcher instead
        if nodes.signal_everywhere(cfg, run_dir, "TERM", ranks_only=True):
            return True
        return rundir.signal_run(run_dir, signal.SIGTERM)
    # Signal only the worker processes: DeepSpeed's launcher answers SIGTERM by killing its ranks
    # 30 s later, which would cut a slow step (QLoRA on a CPU) short of its checkpoint.
    workers = _workers(status.pgid)
    for proc in workers:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    return bool(workers) or rundir.signal_run(run_dir, signal.SIGTERM)


def _run_config(run_dir: str | Path) -> RunConfig | None:
    from engine.run.config import load_config

    try:
        return load_config(Path(run_dir) / rundir.CONFIG)
    except (OSError, ConfigError):
        return None


def _workers(pgid: int | None) -> list[psutil.Process]:
    """The run's rank / job processes (python -m <a kind's module>) in its process group."""
    modules = tuple(k.module for k in jobs.KINDS.values())
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            # the module right after -m: DeepSpeed's launcher also names engine.train, as its argument
            if pgid and os.getpgid(proc.pid) == pgid and "-m" in cmd[:-1] and cmd[cmd.index("-m") + 1] in modules:
                out.append(proc)
        except (psutil.Error, OSError):
            continue
    return out


def wait(run_dir: str | Path, timeout: float | None = None, poll: float = 0.5) -> rundir.Status | None:
    deadline = None if timeout is None else time.time() + timeout
    while True:
        status = rundir.read_status(run_dir)
        if status is not None and status.state not in rundir.ACTIVE + ("queued",):
            return status
        if deadline is not None and time.time() > deadline:
            return status
        time.sleep(poll)


def follow(run_dir: str | Path, out=sys.stdout) -> rundir.Status | None:
    """Stream train.log until the run ends (the CLI's --foreground); Ctrl-C asks for a graceful stop."""
    path = Path(run_dir) / rundir.LOG
    offset = 0
    while True:
        try:
            status = rundir.read_status(run_dir)
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            if chunk:
                out.write(chunk.decode("utf-8", errors="replace"))
                out.flush()
            if status is not None and status.state not in rundir.ACTIVE + ("queued",):
                return status
            time.sleep(0.5)
        except KeyboardInterrupt:
            out.write("\n[workbench] stopping: finishing the current step and saving a checkpoint...\n")
            out.flush()
            stop(run_dir)


# ---------------------------------------------------------------- the supervisor process

def _group_members() -> list[psutil.Process]:
    me, pgid = os.getpid(), os.getpgid(0)
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != me and os.getpgid(p.pid) == pgid:
                out.append(p)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return out


def _allocator(cfg: RunConfig) -> dict[str, str]:
    """tcmalloc or jemalloc for the ranks of a CPU run on this machine (hardware.allocator_env); a multi-node run's
    nodes keep their own."""
    if _multinode(cfg):
        return {}
    from engine.run.hardware import allocator_env

    try:
        return allocator_env()
    except ValueError as err:
        print(f"[workbench] {err}; the system allocator is used", flush=True)
        return {}


def supervise(run_dir: Path) -> int:
    # The stop signal goes to the whole group: the supervisor itself keeps waiting for the workers.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    kind = jobs.KINDS[jobs.kind_of(run_dir)]
    cfg = jobs.load_config(run_dir, kind.name) if kind.deepspeed else None
    if cfg is not None and not _universal_for_resume(cfg, run_dir):
        return 2
    if cfg is not None and not _devices_present(cfg, run_dir):
        return 2
    if cfg is not None:
        cmd = build_command(cfg, run_dir)
    else:
        cmd = [sys.executable, "-m", kind.module, str(run_dir / rundir.CONFIG)]
    print(f"[workbench] {' '.join(cmd)}", flush=True)
    env = dict(os.environ, **nodes.launcher_env(cfg, run_dir), **_allocator(cfg)) if cfg is not None else None
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env)
    code = proc.wait()
    if cfg is not None and _multinode(cfg):
        nodes.signal_everywhere(cfg, run_dir)  # a launcher that died leaves the other nodes' ranks running
    deadline = time.time() + 60
    while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in _group_members()):
        time.sleep(0.5)
    status = rundir.read_status_raw(run_dir) or rundir.Status()
    if status.pid not in (None, os.getpid()):
        return code  # the run was started again since; that attempt owns status.json now
    changes: dict = {"exit_code": code, "ended_at": status.ended_at or time.time()}
    if status.state == "stopping":
        # asked to stop before the trainer could save (e.g. still starting): stopped, not failed
        changes.update(state="stopped")
    elif status.state in rundir.ACTIVE or status.state == "queued":
        changes.update(state="failed", error=status.error or rundir.guess_error(run_dir), error_kind=status.error_kind or "launcher")
    if cfg is not None and _multinode(cfg) and changes.get("state", status.state) == "failed":
        lost = nodes.failure(rundir.log_tail(run_dir, lines=100_000, max_bytes=8_000_000), nodes.selection(cfg.distributed))
        if lost:  # name the node and rank that went first; the others only followed it
            changes.update(state="failed", error=f"{lost}: {changes.get('error') or status.error or ''}".rstrip(": "))
    try:
        rundir.update_status(run_dir, **changes)
    except OSError as err:  # the run reads as failed all the same: its processes are gone (rundir.read_status)
        print(f"[workbench] status.json not updated: {err}", flush=True)
    print(f"[workbench] run ended: {changes.get('state', status.state)} (exit code {code})", flush=True)
    return code


def _devices_present(cfg: RunConfig, run_dir: Path) -> bool:
    """On one machine with GPUs, every id in ``distributed.devices`` is one of them (the ``deepspeed`` runner checked
    this before the launcher was started directly); False (and the run failed, with the reason) when one is not."""
    from engine.run.hardware import gpu_count

    count = gpu_count()
    if not cfg.distributed.devices or not count or _multinode(cfg):
        return True
    missing = [str(i) for i in cfg.distributed.device_ids if i >= count]
    if not missing:
        return True
    error = (f"distributed.devices: GPU {', '.join(missing)} is not on this machine, which has {count} "
             f"(ids 0–{count - 1})")
    rundir.update_status(run_dir, state="failed", ended_at=time.time(), exit_code=2, error=error, error_kind="config")
    print(f"[workbench] run ended: failed ({error})", flush=True)
    return False


def _universal_for_resume(cfg: RunConfig, run_dir: Path) -> bool:
    """A resume on another world size than its ZeRO checkpoint was saved with: convert the checkpoint to DeepSpeed's
    universal format first (beside its shards, which stay as they are; the ranks then load it with
    ``checkpoint.load_universal``). False (and the run failed, with the reason) when DeepSpeed cannot convert it."""
    from engine.run.checkpoint import CheckpointError, make_universal, needs_universal, zero_shards

    r = cfg.training.resume_from
    if not r or cfg.distributed.zero_stage == 0:
        return True
    ckpt = rundir.resumable_checkpoint(run_dir) if r == "latest" else Path(r)
    world = nodes.world_size(cfg.distributed)
    if ckpt is None or not needs_universal(ckpt, world):
        return True
    tag, saved = zero_shards(ckpt)
    print(f"[workbench] {ckpt.name} was saved by {saved} ranks and this run has {world}: converting it to DeepSpeed's "
          f"universal format in {ckpt / (tag + '_universal')} (the checkpoint itself stays as it is)", flush=True)
    t0 = time.time()
    try:
        make_universal(ckpt, sys.executable, log=sys.stdout)
    except (CheckpointError, OSError) as err:
        rundir.update_status(run_dir, state="failed", ended_at=time.time(), exit_code=2, error=str(err), error_kind="config")
        print(f"[workbench] run ended: failed ({err})", flush=True)
        return False
    print(f"[workbench] converted in {time.time() - t0:.0f} s", flush=True)
    return True


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1])))
