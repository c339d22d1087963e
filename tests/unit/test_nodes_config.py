"""Several machines without the network: hostfile and node table, slot selection, the launcher command."""

from __future__ import annotations

import pytest

from engine.run import launch, nodes
from engine.run.checks import check
from engine.run.config import ConfigError, RunConfig, load_config


def _cfg(**distributed) -> RunConfig:
    return RunConfig.model_validate({"distributed": distributed})


def test_hostfile_with_comments_and_blank_lines():
    text = "# the cluster\nnode-a slots=2  # first\n\nnode-b slots=4\n"
    assert nodes.parse_hostfile(text) == {"node-a": 2, "node-b": 4}
    assert nodes.parse_hostfile(nodes.hostfile_text({"node-a": 2, "node-b": 4})) == {"node-a": 2, "node-b": 4}


@pytest.mark.parametrize("text, words", [
    ("node-a slots=2\nnode-b gpus=2\n", "hosts line 2: expected 'HOST slots=N', got 'node-b gpus=2'"),
    ("node-a slots=2\nnode-a slots=1\n", "hosts line 2: node-a is listed twice"),
    ("node-a slots=0\n", "hosts line 1: node-a has slots=0"),
    ("# nothing\n\n", "hosts names no host"),
    ("node;rm slots=1\n", "hosts line 1: expected 'HOST slots=N'"),
])
def test_hostfile_problem_names_the_line(text, words):
    with pytest.raises(nodes.NodeError, match=None) as err:
        nodes.parse_hostfile(text, "hosts")
    assert words in str(err.value)


def test_include_selects_slots_per_node_in_file_order():
    hosts = {"node-a": 2, "node-b": 2}
    assert nodes.select(hosts, "") == {"node-a": [0, 1], "node-b": [0, 1]}
    assert nodes.select(hosts, "node-b:1@node-a") == {"node-a": [0, 1], "node-b": [1]}
    assert nodes.select(hosts, "node-a:1,0") == {"node-a": [0, 1]}
    with pytest.raises(nodes.NodeError, match="node-c, which is not one of the nodes"):
        nodes.select(hosts, "node-c:0")
    with pytest.raises(nodes.NodeError, match="node-b has 2 slot\\(s\\) \\(0-1\\), not slot 2"):
        nodes.select(hosts, "node-b:2")
    with pytest.raises(nodes.NodeError, match="'node-a:x' is not HOST or HOST:SLOT"):
        nodes.select(hosts, "node-a:x")


def test_world_size_counts_chosen_slots():
    assert nodes.world_size(_cfg(num_processes=3).distributed) == 3
    two = [{"host": "node-a", "slots": 2}, {"host": "node-b", "slots": 3}]
    assert nodes.world_size(_cfg(nodes=two).distributed) == 5
    assert nodes.world_size(_cfg(nodes=two, include="node-a:0@node-b:1,2").distributed) == 3


def test_pdsh_command_from_a_hostfile_with_gpus_per_node(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=4\nnode-b slots=4\n")
    cfg = _cfg(hostfile=str(hostfile), include="node-a:0,1@node-b:2,3", master_port=29600, master_addr="10.0.0.1")
    cmd = launch.build_command(cfg, tmp_path / "run")
    i = cmd.index("--hostfile")
    assert cmd[i:i + 11] == ["--hostfile", str(hostfile), "--include", "node-a:0,1@node-b:2,3", "--master_addr",
                             "10.0.0.1", "--master_port", "29600", "--no_ssh_check", "--no_local_rank", "--module"]
    assert "localhost" not in " ".join(cmd) and "--num_gpus" not in cmd


def test_no_ssh_command_carries_the_node_rank(tmp_path):
    cfg = _cfg(nodes=[{"host": "node-a", "slots": 1}, {"host": "node-b", "slots": 1}], launcher="no_ssh", master_port=29601)
    cmd = launch.build_command(cfg, tmp_path / "run", node_rank=1)
    assert cmd[cmd.index("--hostfile") + 1] == str(tmp_path / "run" / "hostfile")
    assert cmd[cmd.index("--master_addr") + 1] == "node-a"  # the first node, when no address is given
    assert cmd[cmd.index("--no_ssh"):cmd.index("--no_ssh") + 3] == ["--no_ssh", "--node_rank", "1"]


def test_node_settings_checked_before_launch(tmp_path):
    two = [{"host": "node-a", "slots": 2}, {"host": "node-b", "slots": 2}]
    bad = tmp_path / "hosts"
    bad.write_text("node-a slots=2\nnode-b\n")
    cases = [
        (_cfg(hostfile=str(bad)), "distributed.hostfile", "line 2: expected 'HOST slots=N', got 'node-b'"),
        (_cfg(hostfile=str(bad), nodes=two), "distributed.nodes", "either in a hostfile or in distributed.nodes"),
        (_cfg(nodes=two, include="node-c"), "distributed.include", "node-c, which is not one of the nodes"),
        (_cfg(include="node-a:0"), "distributed.include", "need several machines"),
        (_cfg(nodes=two, devices="0,1", num_processes=2), "distributed.devices", "distributed.include"),
        (_cfg(nodes=two, num_processes=3), "distributed.num_processes", "the nodes give 4 ranks (node-a: 2, node-b: 2)"),
        (_cfg(nodes=two, launcher="no_ssh"), "distributed.master_port", "set master_port"),
    ]
    for cfg, field, words in cases:
        found = [m for f, m in check(cfg) if f == field]
        assert any(words in m for m in found), (field, words, check(cfg))
    assert not [p for p in check(_cfg(nodes=two, num_processes=4)) if p[0].startswith("distributed")]


def test_node_table_in_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("distributed:\n  nodes:\n    - {host: node-a, slots: 2}\n    - {host: node-b}\n  include: node-b\n")
    cfg = load_config(path)
    assert nodes.selection(cfg.distributed) == {"node-b": [0]}
    path.write_text("distributed:\n  nodes:\n    - {host: node-a, slots: 0}\n")
    with pytest.raises(ConfigError, match="distributed.nodes"):
        load_config(path)


def test_failure_names_the_node_and_rank():
    log = ("node-b: [launch.py:259:sigkill_handler] ['/py', '-u', '-m', 'engine.train', 'c.yaml'] exits with return code = -9\n"
           "node-a: [launch.py:259:sigkill_handler] ['/py', '-u', '-m', 'engine.train', 'c.yaml'] exits with return code = 1\n")
    chosen = {"node-a": [0, 1], "node-b": [0]}
    assert nodes.failure(log, chosen) == "rank 2 on node-b was killed by signal 9; the run stopped on every node"
    assert nodes.failure(log.splitlines()[1], chosen) == "ranks 0, 1 on node-a exited with code 1; the run stopped on every node"
    assert nodes.failure("nothing here", chosen) is None


def test_zero_checkpoint_resumes_on_any_world_size_through_the_universal_format(tmp_path):
    from engine.run.checkpoint import UNIVERSAL_LATEST, needs_universal, universal_dir, zero_shards

    ckpt = tmp_path / "checkpoint-4"
    (ckpt / "global_step4").mkdir(parents=True)
    for rank in (0, 1):
        (ckpt / "global_step4" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    two = [{"host": "node-a", "slots": 1}, {"host": "node-b", "slots": 1}]
    assert zero_shards(ckpt) == ("global_step4", 2)
    assert nodes.resume_problems(ckpt, _cfg(nodes=two, zero_stage=2).distributed) == []
    four = _cfg(nodes=[*two, {"host": "node-c", "slots": 2}], zero_stage=2).distributed
    assert nodes.resume_problems(ckpt, four) == []  # converted by the launcher before the ranks start
    assert not needs_universal(ckpt, 2) and needs_universal(ckpt, nodes.world_size(four)) and needs_universal(ckpt, 1)
    assert universal_dir(ckpt) is None
    (ckpt / "global_step4_universal").mkdir()
    assert universal_dir(ckpt) is None  # no pointer yet: a conversion cut short is not used
    (ckpt / UNIVERSAL_LATEST).write_text("global_step4_universal")
    assert universal_dir(ckpt) == ckpt / "global_step4_universal"
    [(field, msg)] = nodes.resume_problems(ckpt, _cfg(num_processes=2).distributed)
    assert field == "distributed.zero_stage" and "resume it with ZeRO stage 2 or 3" in msg
    assert nodes.resume_problems(tmp_path, _cfg(num_processes=2).distributed) == []  # no ZeRO shards at all


def test_joining_node_needs_a_no_ssh_run_and_its_directory(tmp_path):
    two = [{"host": "node-a", "slots": 1}, {"host": "node-b", "slots": 1}]
    with pytest.raises(ConfigError, match="--node-rank joins a no_ssh run"):
        nodes.join(_cfg(nodes=two), 1)
    cfg = RunConfig.model_validate({"distributed": {"nodes": two, "launcher": "no_ssh", "master_port": 29602},
                                    "output": {"run_dir": str(tmp_path / "run")}})
    with pytest.raises(ConfigError, match="config.yaml did not appear within 1 s: node 0 starts the run there"):
        nodes.join(cfg, 1, wait_s=1)


def test_run_files_hostfile_and_forwarded_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN_NOTE", "a b; rm -rf /")  # not a plain value: never pasted into a remote shell
    cfg = _cfg(nodes=[{"host": "node-a", "slots": 2}, {"host": "node-b", "slots": 1}])
    nodes.write_run_files(cfg, tmp_path)
    assert (tmp_path / "hostfile").read_text() == "node-a slots=2\nnode-b slots=1\n"
    env = (tmp_path / "deepspeed_env").read_text().splitlines()
    assert {"WORKBENCH_THREADS=1", "HF_HUB_OFFLINE=1", "TOKENIZERS_PARALLELISM=false"} <= set(env)
    assert not any(line.startswith("HF_TOKEN_NOTE") for line in env) and "" not in env
    assert nodes.launcher_env(cfg, tmp_path) == {"DS_ENV_FILE": str(tmp_path / "deepspeed_env")}
    assert nodes.launcher_env(_cfg(), tmp_path) == {}
