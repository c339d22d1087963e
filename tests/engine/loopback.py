"""A two-node cluster on one machine: a throwaway sshd on loopback and ssh host names for it.

``node-a`` and ``node-b`` both reach 127.0.0.1 on the sshd's first port with a throwaway key, as pdsh and
DeepSpeed's launcher would reach two machines. ``node-elsewhere`` is a node that sees a different
filesystem under /tmp (its sshd port rewrites /tmp/ to /tmp/elsewhere/ in every command), and ``node-down``
is a host nobody answers for. Nothing in ~/.ssh is touched: ssh and pdsh read the config through
``-F`` in PDSH_SSH_ARGS_APPEND, which Workbench's own ssh calls honour too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def missing() -> str | None:
    """Why no loopback cluster can run here, or None."""
    for tool in (SSHD, "ssh", "ssh-keygen", "pdsh"):
        if not (Path(tool).is_file() if tool.startswith("/") else shutil.which(tool)):
            return f"{tool} is not installed (apt-get install openssh-server pdsh)"
    if os.geteuid() != 0:
        return "the loopback sshd needs root (it logs in as the current user only when run as root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def cluster(tmp: Path):
    """Start the sshd; yields the ssh config path. Sets PDSH_SSH_ARGS_APPEND while it lasts."""
    tmp.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / key)], check=True)
    (tmp / "authorized_keys").write_text((tmp / "id.pub").read_text())
    port, far, down = _free_port(), _free_port(), _free_port()
    rewrite = 'eval "$(printf %s "$SSH_ORIGINAL_COMMAND" | sed s#/tmp/#/tmp/elsewhere/#g)"'
    (tmp / "sshd_config").write_text(f"""\
Port {port}
Port {far}
ListenAddress 127.0.0.1
HostKey {tmp / 'host_key'}
PidFile {tmp / 'sshd.pid'}
AuthorizedKeysFile {tmp / 'authorized_keys'}
PermitRootLogin yes
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
MaxStartups 100
MaxSessions 100
Match LocalPort {far}
    ForceCommand /bin/sh -c '{rewrite}'
""")
    user = os.environ.get("USER") or "root"
    common = f"""    HostName 127.0.0.1
    User {user}
    IdentityFile {tmp / 'id'}
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
"""
    config = tmp / "ssh_config"
    config.write_text(f"Host node-a node-b\n    Port {port}\n{common}Host node-elsewhere\n    Port {far}\n{common}"
                      f"Host node-down\n    Port {down}\n{common}")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
    log = open(tmp / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-f", str(tmp / "sshd_config"), "-D", "-e"], stdout=log, stderr=subprocess.STDOUT)
    saved = os.environ.get("PDSH_SSH_ARGS_APPEND")
    os.environ["PDSH_SSH_ARGS_APPEND"] = f"-F {config}"
    try:
        deadline = time.time() + 20
        while True:
            ok = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "node-a", "true"],
                                capture_output=True, stdin=subprocess.DEVNULL).returncode == 0
            if ok:
                break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the loopback sshd did not come up: {(tmp / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield config
    finally:
        if saved is None:
            os.environ.pop("PDSH_SSH_ARGS_APPEND", None)
        else:
            os.environ["PDSH_SSH_ARGS_APPEND"] = saved
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
