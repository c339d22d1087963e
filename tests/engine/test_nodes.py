"""Two nodes on one machine (a loopback sshd, see loopback.py): pdsh and no_ssh runs, pre-flight refusals,
a rank lost on another node, Stop on every node."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.run import launch, rundir
from engine.run.config import ConfigError, dump_config
from tests.engine.loopback import cluster, missing
from tests.engine.test_train import _cfg, _losses

ROOT = Path(__file__).resolve().parents[2]
TWO = [{"host": "node-a", "slots": 1}, {"host": "node-b", "slots": 1}]

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    with cluster(tmp_path_factory.mktemp("loopback-ssh")) as config:
        yield config


@pytest.fixture
def one_thread(monkeypatch):
    # each node's launcher sizes its ranks' threads by its own cores; both "nodes" share two here
    monkeypatch.setenv("WORKBENCH_THREADS", "1")


def _two_node_cfg(tiny_model, run_dir, **distributed):
    return _cfg(tiny_model, run_dir, distributed={"nodes": TWO, "master_addr": "127.0.0.1", **distributed},
                training={"max_steps": 4, "save_steps": 4})


def _leftovers(run_dir) -> list[str]:
    """Processes of the run on any node (here: anywhere on the machine), by command line."""
    needle = str(Path(run_dir) / "config.yaml")
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if needle in cmd and "engine.train" in cmd:
            out.append(f"{p.pid}: {cmd[:200]}")
    return out


def _wait_gone(run_dir, timeout=60) -> list[str]:
    deadline = time.time() + timeout
    while (left := _leftovers(run_dir)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def _rank(run_dir, rank: int, timeout=240) -> psutil.Process:
    """The process of one global rank, found by its environment once it trains."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                if cmd[1:4] == ["-u", "-m", "engine.train"] and cmd[-1] == str(Path(run_dir) / "config.yaml") \
                        and p.environ().get("RANK") == str(rank):
                    return p
            except (psutil.Error, IndexError):
                continue
        time.sleep(0.5)
    raise AssertionError(f"rank {rank} never started: {rundir.log_tail(run_dir)}")


def _until_step(run_dir, step: int, timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step for r in rundir.read_metrics(run_dir)):
            return
        status = rundir.read_status(run_dir)
        assert status is None or status.state not in ("failed", "completed"), rundir.log_tail(run_dir)
        time.sleep(0.5)
    raise AssertionError(f"no step {step} within {timeout} s: {rundir.log_tail(run_dir)}")


def _ended(run_dir, timeout) -> rundir.Status:
    """The status once the supervisor has recorded the end (rank 0 may write `failed` a moment before)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = rundir.read_status(run_dir)
        if status.exit_code is not None:
            return status
        time.sleep(0.5)
    raise AssertionError(f"not ended within {timeout} s: {rundir.read_status(run_dir)}")


# ---------------------------------------------------------------- pre-flight: each refusal, one sentence

def _refusal(cfg) -> str:
    with pytest.raises(ConfigError) as err:
        launch.start(cfg)
    assert not Path(cfg.output.run_dir).exists(), "a refused run leaves no run directory"
    return str(err.value)


def test_unreachable_host_is_named_with_the_ssh_error(loop, tiny_model, tmp_path):
    t = time.time()
    msg = _refusal(_two_node_cfg(tiny_model, tmp_path / "run", nodes=[TWO[0], {"host": "node-down", "slots": 1}]))
    assert "node-down is not reachable by ssh without a password: ssh: connect to host 127.0.0.1 port" in msg
    assert "Connection refused" in msg and "node-a" not in msg
    assert time.time() - t < 30  # no hang


def test_hostfile_syntax_names_the_line(loop, tiny_model, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=1\nnode-b slot=1\n")
    msg = _refusal(_cfg(tiny_model, tmp_path / "run", distributed={"hostfile": str(hostfile)}))
    assert f"distributed.hostfile: {hostfile} line 3: expected 'HOST slots=N', got 'node-b slot=1'" in msg


def test_missing_pdsh_is_refused(loop, tiny_model, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(subprocess.check_output(["which", "ssh"], text=True).strip(), bin_dir / "ssh")
    monkeypatch.setenv("PATH", str(bin_dir))
    msg = _refusal(_two_node_cfg(tiny_model, tmp_path / "run"))
    assert "distributed.launcher: pdsh is not installed on this machine" in msg


def test_taken_port_is_refused(loop, tiny_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        msg = _refusal(_two_node_cfg(tiny_model, tmp_path / "run", master_port=port))
    assert f"distributed.master_port: port {port} on 127.0.0.1 is already taken" in msg


def test_run_dir_not_visible_from_a_node(loop, tiny_model, tmp_path):
    Path("/tmp/elsewhere").mkdir(exist_ok=True)  # node-elsewhere sees /tmp/elsewhere/... where we see /tmp/...
    msg = _refusal(_two_node_cfg(tiny_model, tmp_path / "run", nodes=[TWO[0], {"host": "node-elsewhere", "slots": 1}]))
    assert f"output.run_dir: node-elsewhere cannot write the run directory {tmp_path / 'run'}" in msg
    assert "node-a cannot" not in msg


def test_more_slots_than_the_node_has(loop, tiny_model, tmp_path):
    cores = os.cpu_count()
    msg = _refusal(_two_node_cfg(tiny_model, tmp_path / "run", nodes=[TWO[0], {"host": "node-b", "slots": cores + 3}],
                                 num_processes=cores + 4))
    assert f"node-b has {cores} CPU core(s), but the run uses {cores + 3} slot(s) there" in msg


# ---------------------------------------------------------------- real runs

@pytest.mark.slow
def test_two_nodes_by_pdsh_match_two_ranks_on_one(loop, tiny_model, tmp_path, one_thread):
    t = time.time()
    one = launch.start(_cfg(tiny_model, tmp_path / "1x2", distributed={"num_processes": 2, "zero_stage": 2},
                            training={"max_steps": 4, "save_steps": 4}))
    assert launch.wait(one, timeout=600).state == "completed", rundir.log_tail(one)
    t_one = time.time() - t
    t = time.time()
    two = launch.start(_two_node_cfg(tiny_model, tmp_path / "2x1", zero_stage=2))
    status = launch.wait(two, timeout=600)
    t_two = time.time() - t
    log = (two / "train.log").read_text()
    assert status.state == "completed", rundir.log_tail(two)
    assert "pdsh -S -f 1024 -w node-a,node-b" in log and "dist_world_size=2" in log
    assert "node-a: " in log and "node-b: " in log
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
    assert (two / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert _wait_gone(two) == []
    print(f"\n1 node x 2 ranks: {t_one:.0f} s; 2 nodes x 1 rank (pdsh): {t_two:.0f} s")


@pytest.mark.heavy
@pytest.mark.slow
def test_two_nodes_without_ssh(loop, tiny_model, tmp_path, one_thread):
    """no_ssh: node 0 starts the run; node 1 joins it with `workbench train CONFIG --node-rank 1`."""
    cfg = _two_node_cfg(tiny_model, tmp_path / "run", launcher="no_ssh", master_port=launch.free_port())
    config = tmp_path / "run.yaml"
    dump_config(cfg, config)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    node1 = subprocess.Popen([sys.executable, "-m", "engine.cli", "train", str(config), "--node-rank", "1"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = launch.start(cfg)
    status = launch.wait(run_dir, timeout=600)
    out = node1.communicate(timeout=120)[0]
    assert status.state == "completed", rundir.log_tail(run_dir) + out
    assert node1.returncode == 0, out
    assert "--no_ssh --node_rank 1" in out and "--no_ssh --node_rank 0" in (run_dir / "train.log").read_text()
    assert sorted(_losses(run_dir)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_rank_killed_on_node_b_fails_the_run_naming_it(loop, tiny_model, tmp_path, one_thread):
    run_dir = launch.start(_cfg(tiny_model, tmp_path / "run", distributed={"nodes": TWO, "master_addr": "127.0.0.1"},
                                training={"max_steps": 2000, "save_steps": 5000}))
    _until_step(run_dir, 1)
    _rank(run_dir, 1).send_signal(signal.SIGKILL)
    status = _ended(run_dir, timeout=60)
    assert status.state == "failed", rundir.log_tail(run_dir)
    assert status.error.startswith("rank 1 on node-b was killed by signal 9; the run stopped on every node"), status.error
    assert _wait_gone(run_dir) == []


@pytest.mark.heavy
@pytest.mark.slow
def test_stop_saves_and_leaves_no_process_on_any_node(loop, tiny_model, tmp_path, one_thread):
    run_dir = launch.start(_cfg(tiny_model, tmp_path / "run", distributed={"nodes": TWO, "master_addr": "127.0.0.1"},
                                training={"max_steps": 2000, "save_steps": 5000}))
    _until_step(run_dir, 2)
    assert launch.stop(run_dir)
    status = launch.wait(run_dir, timeout=180)
    assert status.state == "stopped", rundir.log_tail(run_dir)
    assert rundir.latest_checkpoint(run_dir) is not None
    assert _wait_gone(run_dir) == []


@pytest.mark.heavy
@pytest.mark.slow
def test_killed_launcher_leaves_no_rank_on_any_node(loop, tiny_model, tmp_path, one_thread):
    run_dir = launch.start(_cfg(tiny_model, tmp_path / "run", distributed={"nodes": TWO, "master_addr": "127.0.0.1"},
                                training={"max_steps": 2000, "save_steps": 5000}))
    _until_step(run_dir, 1)
    pgid = rundir.read_status(run_dir).pgid
    runner = [p for p in psutil.process_iter(["cmdline"]) if os.getpgid(p.pid) == pgid
              and any(a.endswith("deepspeed") or a == "deepspeed.launcher.runner" for a in p.info["cmdline"] or [])]
    assert runner, rundir.log_tail(run_dir)
    runner[0].send_signal(signal.SIGKILL)
    status = _ended(run_dir, timeout=90)
    assert status.state == "failed", rundir.log_tail(run_dir)
    assert _wait_gone(run_dir) == []


@pytest.mark.heavy
@pytest.mark.slow
def test_zero3_two_nodes_saves_a_whole_adapter(loop, tiny_model, tmp_path, one_thread):
    run_dir = launch.start(_two_node_cfg(tiny_model, tmp_path / "run", zero_stage=3))
    status = launch.wait(run_dir, timeout=600)
    assert status.state == "completed", rundir.log_tail(run_dir)
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    # whole matrices gathered from both nodes (rank 8 by the tiny model's 64/128 dims, 32 for k and v: two key-value
    # heads of 16), not one node's shard
    assert len(weights) == 28 and all(t.dim() == 2 and min(t.shape) == 8 and max(t.shape) in (32, 64, 128)
                                      for t in weights.values())
    assert tuple(weights["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape) == (32, 8)
    assert tuple(weights["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape) == (8, 128)
    assert _wait_gone(run_dir) == []
