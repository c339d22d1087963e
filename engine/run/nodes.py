"""Several machines: the node list, the slots each node gives, the launcher arguments and the pre-flight.

A multi-node run names its nodes in a DeepSpeed hostfile (``host slots=N`` lines, ``#`` comments) or in
``distributed.nodes`` (the same as a table in the config), and picks slots per node with
``distributed.include`` in DeepSpeed's own ``--include`` syntax (``node-a:0,1@node-b:0``; a bare host takes
all its slots). Two launch modes:

- ``pdsh``: the launcher on this machine starts every node's ranks over ssh with pdsh;
- ``no_ssh``: every node runs ``workbench train CONFIG --node-rank N`` itself (Slurm's srun, a job script).

``check_problems`` reads only the config and the hostfile (no network); ``preflight`` asks every node over
ssh, in parallel, before any compute: reachable without a password, the interpreter there, enough slots,
the run directory visible (each node writes a marker that this machine reads back). Imports no torch.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.run.config import DistributedConfig, RunConfig

Problem = tuple[str, str]
HOSTFILE = "hostfile"  # the run directory's copy when the nodes come from distributed.nodes
ENV_FILE = "deepspeed_env"  # variables the launcher exports to every node (DeepSpeed's DS_ENV_FILE)
SSH_TIMEOUT = 5
_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FORWARD = ("WORKBENCH_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "NCCL_", "GLOO_")


LOCAL = "localhost"  # the one name of this machine in the device queue (engine/run/queue.py)
_LOCAL_ALIASES = {"localhost", "localhost.localdomain", "127.0.0.1", "::1", "0.0.0.0"}


def canonical_host(host: str) -> str:
    """``LOCAL`` for every name of this machine (localhost, a loopback address, its own host name, short or full),
    else the name as written (ssh aliases are not resolved: two aliases are two nodes to the queue)."""
    name = host.strip().lower()
    if name in _LOCAL_ALIASES or name.startswith("127."):
        return LOCAL
    return LOCAL if name in _own_names() else host.strip()


@functools.lru_cache(maxsize=1)
def _own_names() -> frozenset[str]:
    own = {socket.gethostname().lower(), socket.gethostname().split(".")[0].lower()}
    try:
        own.add(socket.getfqdn().lower())  # may ask the resolver once; cached for the process
    except OSError:
        pass
    return frozenset(own)


class NodeError(ValueError):
    """A node list or slot selection that cannot be used; the message is one sentence."""


def parse_hostfile(text: str, source: str = "hostfile", quote: bool = True) -> dict[str, int]:
    """``{host: slots}`` in file order; the error names the line (and quotes it, unless ``quote`` is False: the web
    page never echoes a file's content)."""
    hosts: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m or not _HOST.match(m.group(1)):
            raise NodeError(f"{source} line {n}: expected 'HOST slots=N'" + (f", got '{line[:80]}'" if quote else ""))
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise NodeError(f"{source} line {n}: {host} has slots=0; give it at least one slot or remove the line")
        if host in hosts:
            raise NodeError(f"{source} line {n}: {host} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise NodeError(f"{source} names no host (expected lines such as 'node-a slots=2')")
    return hosts


def hostfile_text(hosts: dict[str, int]) -> str:
    return "".join(f"{h} slots={s}\n" for h, s in hosts.items())


def pool(d: DistributedConfig) -> dict[str, int] | None:
    """The nodes and their slot counts, or None for a run on this machine alone. Raises NodeError."""
    if d.hostfile and d.nodes:
        raise NodeError("give the nodes either in a hostfile or in distributed.nodes, not both")
    if d.nodes:
        hosts: dict[str, int] = {}
        for i, node in enumerate(d.nodes):
            if not _HOST.match(node.host):
                raise NodeError(f"distributed.nodes[{i}]: '{node.host}' is not a host name")
            if node.host in hosts:
                raise NodeError(f"distributed.nodes[{i}]: {node.host} is listed twice")
            hosts[node.host] = node.slots
        return hosts
    if d.hostfile:
        try:
            text = Path(d.hostfile).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise NodeError(f"cannot read the hostfile {d.hostfile}: {getattr(err, 'strerror', None) or err}") from None
        return parse_hostfile(text, d.hostfile)
    return None


def select(hosts: dict[str, int], include: str) -> dict[str, list[int]]:
    """The slots used on each node (file order), from DeepSpeed's ``--include`` syntax; empty: every slot."""
    if not include.strip():
        return {h: list(range(s)) for h, s in hosts.items()}
    chosen: dict[str, list[int]] = {}
    for spec in include.replace(" ", "").split("@"):
        host, _, slots = spec.partition(":")
        if host not in hosts:
            raise NodeError(f"distributed.include names {host or '(nothing)'}, which is not one of the nodes ({', '.join(hosts)})")
        if not slots:
            ids = list(range(hosts[host]))
        elif re.fullmatch(r"\d+(,\d+)*", slots):
            ids = sorted({int(x) for x in slots.split(",")})
        else:
            raise NodeError(f"distributed.include: '{spec}' is not HOST or HOST:SLOT,SLOT (e.g. node-a:0,1@node-b:0)")
        over = [i for i in ids if i >= hosts[host]]
        if over:
            raise NodeError(f"distributed.include: {host} has {hosts[host]} slot(s) (0-{hosts[host] - 1}), not slot {over[0]}")
        chosen[host] = sorted(set(chosen.get(host, [])) | set(ids))
    return {h: chosen[h] for h in hosts if h in chosen}


def selection(d: DistributedConfig) -> dict[str, list[int]] | None:
    """``{host: [slot, ...]}`` of a multi-node run, None on one machine. Raises NodeError."""
    hosts = pool(d)
    return None if hosts is None else select(hosts, d.include)


def world_size(d: DistributedConfig) -> int:
    """Ranks in the whole run (every node's chosen slots, or this machine's processes)."""
    try:
        chosen = selection(d)
    except NodeError:
        chosen = None
    return d.num_processes if chosen is None else sum(len(s) for s in chosen.values())


def master_addr(d: DistributedConfig, chosen: dict[str, list[int]]) -> str:
    """Where every rank meets rank 0: distributed.master_addr, else the first node's name."""
    return d.master_addr or next(iter(chosen))


def hostfile_path(cfg: RunConfig, run_dir: str | Path) -> str:
    return cfg.distributed.hostfile or str(Path(run_dir) / HOSTFILE)


def launcher_args(cfg: RunConfig, run_dir: str | Path, port: int, node_rank: int = 0) -> list[str]:
    """The DeepSpeed launcher's node arguments (after ``deepspeed``) of a multi-node run."""
    d = cfg.distributed
    chosen = selection(d)
    include = "@".join(f"{h}:{','.join(map(str, s))}" for h, s in chosen.items())
    args = ["--hostfile", hostfile_path(cfg, run_dir), "--include", include,
            "--master_addr", master_addr(d, chosen), "--master_port", str(port)]
    if d.launcher == "no_ssh":
        return args + ["--no_ssh", "--node_rank", str(node_rank)]
    # Workbench checks ssh itself (preflight, with the ssh options pdsh gets); DeepSpeed's check ignores them.
    return args + ["--no_ssh_check"]


# ---------------------------------------------------------------- checks without the network

def check_problems(cfg: RunConfig) -> list[Problem]:
    """Problems of the node settings that the config and the hostfile show (no ssh)."""
    d = cfg.distributed
    try:
        chosen = selection(d)
    except NodeError as err:
        field = "distributed.include" if str(err).startswith("distributed.include") else \
            "distributed.nodes" if d.nodes else "distributed.hostfile"
        return [(field, str(err))]
    if chosen is None:
        return [("distributed.include", "slots per node need several machines: set a hostfile or distributed.nodes")] \
            if d.include.strip() else []
    out = []
    if d.launcher == "no_ssh" and not d.master_port:
        out.append(("distributed.master_port", "no_ssh mode starts each node on its own, so they must agree on a port: set master_port"))
    if d.launcher == "no_ssh" and not cfg.output.run_dir:
        out.append(("output.run_dir", "no_ssh mode: every node joins the run by its directory, so set output.run_dir (on a shared filesystem)"))
    if d.devices.strip():
        out.append(("distributed.devices", "devices picks GPUs of this machine; with several machines pick each node's slots in distributed.include (e.g. node-a:0,1@node-b:0)"))
    n = sum(len(s) for s in chosen.values())
    if d.num_processes not in (1, n):
        out.append(("distributed.num_processes", f"the nodes give {n} ranks ({', '.join(f'{h}: {len(s)}' for h, s in chosen.items())}); leave num_processes at 1 or set it to {n}"))
    return out


def resume_problems(checkpoint: Path, d: DistributedConfig) -> list[Problem]:
    """A ZeRO checkpoint holds one optimizer shard per rank. On another world size it resumes through DeepSpeed's
    universal format (the supervisor converts it before the ranks start, see ``checkpoint.make_universal``), which
    needs ZeRO on this run too: without it DeepSpeed does not load the checkpoint at all."""
    from engine.run.checkpoint import zero_shards

    zero = zero_shards(checkpoint)
    if zero is None:
        return []
    if d.zero_stage == 0:
        return [("distributed.zero_stage", f"{checkpoint.name} holds DeepSpeed ZeRO optimizer shards ({zero[1]} ranks): "
                 "resume it with ZeRO stage 2 or 3 (DeepSpeed loads its optimizer state, on any number of ranks)")]
    return []


# ---------------------------------------------------------------- pre-flight over ssh

def ssh_command(host: str, command: str) -> list[str]:
    """ssh to ``host`` without a password prompt, with the extra options pdsh gets (PDSH_SSH_ARGS_APPEND)."""
    extra = shlex.split(os.environ.get("PDSH_SSH_ARGS_APPEND", ""))
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT}", *extra, host, command]


def _probe(host: str, run_dir: Path, marker: str) -> tuple[int, str, str]:
    """On ``host``: the interpreter, its CPU and GPU counts, and a marker written into the run directory."""
    py = shlex.quote(sys.executable)
    mark = shlex.quote(str(run_dir / marker))
    script = (f"test -x {py} && echo python=ok; echo cpus=$(nproc); "
              f"echo gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); "
              f"echo {shlex.quote(host)} > {mark} 2>/dev/null && echo marker=ok; true")
    try:
        p = subprocess.run(ssh_command(host, script), capture_output=True, text=True, timeout=SSH_TIMEOUT + 25, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 255, "", f"no answer within {SSH_TIMEOUT + 25} s"
    return p.returncode, p.stdout, p.stderr


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently added")]
    return lines[-1] if lines else "no message"


def _port_taken(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=2):
            return True
    except OSError:
        return False


def preflight(cfg: RunConfig, run_dir: str | Path) -> list[Problem]:
    """Ask every node before any compute; each problem is one sentence naming the host. [] on one machine.

    ``run_dir`` must exist: each node writes a marker file there, which must then be visible here.
    """
    d, run_dir = cfg.distributed, Path(run_dir)
    chosen = selection(d)
    if chosen is None:
        return []
    out: list[Problem] = []
    addr = master_addr(d, chosen)
    if d.master_port and _port_taken(addr, d.master_port):
        out.append(("distributed.master_port", f"port {d.master_port} on {addr} is already taken; choose another or leave it empty"))
    if d.launcher == "no_ssh":
        return out  # the nodes start themselves; each checks the run directory when it joins
    if shutil.which("pdsh") is None:
        out.append(("distributed.launcher", "pdsh is not installed on this machine (DeepSpeed starts the other nodes' ranks with it): install pdsh, or use distributed.launcher=no_ssh"))
    if shutil.which("ssh") is None:
        return out + [("distributed.launcher", "ssh is not installed on this machine: install openssh-client, or use distributed.launcher=no_ssh")]
    marker = f".node-check-{os.getpid()}"
    with ThreadPoolExecutor(max_workers=min(32, len(chosen))) as ex:
        answers = dict(zip(chosen, ex.map(lambda h: _probe(h, run_dir, f"{marker}-{h}"), chosen)))
    field = "distributed.hostfile" if d.hostfile else "distributed.nodes"
    for host, (code, stdout, stderr) in answers.items():
        facts = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
        if code == 255 or "cpus" not in facts:
            out.append((field, f"{host} is not reachable by ssh without a password: {_last_line(stderr)}"))
            continue
        if facts.get("python") != "ok":
            out.append((field, f"{host} has no {sys.executable}: every node needs the same Python environment at the same path"))
        gpus, cpus = (int(v) if v.strip().isdigit() else 0 for v in (facts.get("gpus", ""), facts.get("cpus", "")))
        have, what = (gpus, "GPU(s)") if gpus else (cpus, "CPU core(s)")
        top = max(chosen[host]) + 1
        if have and top > have:
            out.append((field, f"{host} has {have} {what}, but the run uses {top} slot(s) there"))
        path = run_dir / f"{marker}-{host}"
        if facts.get("marker") != "ok" or not path.is_file():
            out.append(("output.run_dir", f"{host} cannot write the run directory {run_dir} where this machine sees it: every node needs it on a shared filesystem at the same path"))
        path.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- while running and after

def write_run_files(cfg: RunConfig, run_dir: str | Path) -> None:
    """The run directory's hostfile (from distributed.nodes) and the variables every node gets."""
    run_dir = Path(run_dir)
    chosen = selection(cfg.distributed)
    if chosen is None:
        return
    if not cfg.distributed.hostfile:
        (run_dir / HOSTFILE).write_text(hostfile_text(pool(cfg.distributed)), encoding="utf-8")
    # only plain values: DeepSpeed pastes them into the remote shell command line
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(_FORWARD) and re.fullmatch(r"[\w@%+=:,./-]*", v)]
    env += ["PYTHONUNBUFFERED=1", "TOKENIZERS_PARALLELISM=false"]
    (run_dir / ENV_FILE).write_text("\n".join(dict.fromkeys(env)) + "\n", encoding="utf-8")


def launcher_env(cfg: RunConfig, run_dir: str | Path) -> dict[str, str]:
    """Environment additions for the DeepSpeed launcher of a multi-node run."""
    return {"DS_ENV_FILE": str(Path(run_dir) / ENV_FILE)} if selection(cfg.distributed) is not None else {}


def signal_everywhere(cfg: RunConfig, run_dir: str | Path, sig: str = "KILL", ranks_only: bool = False) -> bool:
    """Signal the run's processes on every node over ssh (pdsh mode): the ranks alone (TERM: finish the step,
    save, stop; they agree on the step among themselves), or also each node's launcher (KILL: nothing left).
    True when some node had such a process."""
    chosen = selection(cfg.distributed)
    if chosen is None or cfg.distributed.launcher != "pdsh" or shutil.which("ssh") is None:
        return False
    config = re.escape(str(Path(run_dir) / "config.yaml"))
    # a rank is `python -u -m engine.train CONFIG`; its node's launcher names `engine.train CONFIG` too.
    # The [x] bracket keeps the pattern from matching the ssh and shell commands that carry it.
    pattern = rf"[-]u -m engine\.train {config}" if ranks_only else rf"[e]ngine\.train {config}"
    command = f"pkill -{sig} -f -- {shlex.quote(pattern)} && echo signalled; true"

    def one(host: str) -> bool:
        try:
            return "signalled" in subprocess.run(ssh_command(host, command), capture_output=True, text=True,
                                                 timeout=SSH_TIMEOUT + 10, stdin=subprocess.DEVNULL).stdout
        except subprocess.TimeoutExpired:
            return False

    with ThreadPoolExecutor(max_workers=min(32, len(chosen))) as ex:
        return any(list(ex.map(one, chosen)))


_EXIT = re.compile(r"^(\S+): .*exits with return code = (-?\d+)")


def failure(log_text: str, chosen: dict[str, list[int]]) -> str | None:
    """The node whose launcher reported a dead rank, as one sentence naming the node and its ranks."""
    ranks, n = {}, 0
    for host, slots in chosen.items():  # DeepSpeed numbers the ranks node by node, in hostfile order
        ranks[host], n = list(range(n, n + len(slots))), n + len(slots)
    exits: list[tuple[str, int]] = []
    for line in log_text.splitlines():
        e = _EXIT.match(line.strip())
        if e:
            exits.append((e.group(1), int(e.group(2))))
    if not exits:
        return None
    # a rank killed by a signal went first; the others failed in a collective after it
    host, code = min(exits, key=lambda hc: hc[1] >= 0)
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    who = ranks.get(host)
    rank = f"rank {who[0]}" if who and len(who) == 1 else f"ranks {', '.join(map(str, who))}" if who else "a rank"
    return f"{rank} on {host} {how}; the run stopped on every node"


def join(cfg: RunConfig, node_rank: int, wait_s: float = 300.0) -> int:
    """no_ssh mode, node ``node_rank`` > 0: wait for node 0's run directory, then run this node's ranks here."""
    import subprocess as sp
    import time

    from engine.run import launch, rundir
    from engine.run.config import ConfigError, load_config

    d = cfg.distributed
    if d.launcher != "no_ssh" or not cfg.output.run_dir:
        raise ConfigError([("distributed.launcher", "--node-rank joins a no_ssh run: set distributed.launcher=no_ssh and output.run_dir")])
    run_dir = Path(cfg.output.run_dir).expanduser().resolve()
    config = run_dir / rundir.CONFIG
    deadline = time.time() + wait_s
    while not config.is_file():
        if time.time() > deadline:
            raise ConfigError([("output.run_dir", f"{config} did not appear within {wait_s:.0f} s: node 0 starts the run there, and every node must see that directory (a shared filesystem)")])
        time.sleep(1)
    run_cfg = load_config(config)
    chosen = selection(run_cfg.distributed) or {}
    if not 0 < node_rank < len(chosen):
        raise ConfigError([("--node-rank", f"node rank {node_rank} is not one of 1..{len(chosen) - 1} (node 0 starts the run)")])
    cmd = launch.build_command(run_cfg, run_dir, node_rank)
    print(f"[workbench] node {node_rank} ({list(chosen)[node_rank]}): {' '.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    return sp.run(cmd, stdin=sp.DEVNULL, env=env).returncode
