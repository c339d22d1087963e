"""Run config: validation, YAML round trip, overrides, shipped configs, the launcher command."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.run import rundir
from engine.run.checks import check
from engine.run.config import ConfigError, RunConfig, apply_overrides, dump_config, load_config, parse_config
from engine.run.launch import build_command, resolve_paths

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "configs" / "examples").glob("*.yaml") if not p.stem.startswith(("eval", "export")))  # job configs: test_jobconfig.py


def test_defaults_round_trip(tmp_path):
    cfg = RunConfig()
    path = tmp_path / "c.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg
    cfg.training.max_steps = 30
    cfg.data.datasets = ["identity", "instruct_demo"]
    dump_config(cfg, path)
    again = load_config(path)
    assert again.training.max_steps == 30 and again.data.datasets == ["identity", "instruct_demo"]


def test_every_field_has_a_description():
    for section, info in RunConfig.model_fields.items():
        for name, field in info.annotation.model_fields.items():
            assert field.description, f"{section}.{name} has no description"


def test_unknown_key_names_field_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: x\ntraining:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == [("training.learning_rat (line 4)", "unknown field (not part of the run config)")]
    assert str(path) in str(err.value)


@pytest.mark.parametrize("field, value", [("learning_rate", 0), ("learning_rate", -1e-4),
                                          ("per_device_train_batch_size", 0)])
def test_non_positive_values_are_refused(field, value):
    with pytest.raises(ConfigError) as err:
        parse_config({"training": {field: value}})
    assert err.value.problems[0][0] == f"training.{field}"


def test_non_positive_cutoff_is_refused():
    with pytest.raises(ConfigError, match="data.cutoff_len"):
        parse_config({"data": {"cutoff_len": 0}})


def test_invalid_yaml_says_where(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(path)


def test_overrides():
    data = apply_overrides({}, ["training.max_steps=30", "data.datasets=[identity, instruct_demo]", "model.quantization=nf4"])
    cfg = parse_config(data)
    assert cfg.training.max_steps == 30 and cfg.data.datasets == ["identity", "instruct_demo"] and cfg.model.quantization == "nf4"
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides({}, ["max_steps"])
    with pytest.raises(ConfigError, match="unknown section"):
        apply_overrides({}, ["train.max_steps=3"])


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_example_configs_are_valid(path, default_model, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = resolve_paths(load_config(path))
    problems = check(cfg)
    if cfg.method.stage == "rl":  # its reward model is what rm.yaml trains, which may not have run yet
        final = (Path(load_config(path.with_name("rm.yaml")).output.run_dir) / rundir.FINAL).resolve()
        assert cfg.method.reward_model == str(final)
        if not final.exists():
            problems = [(f, m) for f, m in problems if not (f == "method.reward_model" and "not found" in m)]
    assert problems == []


def test_every_stage_has_an_example():
    from engine.train.stages import STAGES

    assert {p.stem for p in EXAMPLES} >= set(STAGES) - {"sft"} and "lora_sft" in {p.stem for p in EXAMPLES}


def test_shipped_deepspeed_configs_parse():
    names = {p.name for p in (ROOT / "configs" / "deepspeed").glob("*.json")}
    assert {"zero2.json", "zero3.json", "zero2_offload.json", "zero3_offload.json"} <= names
    z3 = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def _world(cmd: list[str]) -> dict:
    return json.loads(base64.urlsafe_b64decode(cmd[cmd.index("--world_info") + 1]))


def test_build_command_devices_and_processes(tmp_path):
    """One machine: DeepSpeed's per-node launcher itself, with the world the `deepspeed` runner would give it."""
    cfg = RunConfig()
    cmd = build_command(cfg, tmp_path)
    assert cmd[:4] == [sys.executable, "-u", "-m", "engine.run.dslaunch"]
    assert _world(cmd) == {"localhost": [0]} and cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"
    assert cmd[-4:] == ["--no_local_rank", "--module", "engine.train", str(tmp_path / "config.yaml")]
    cfg.distributed.devices, cfg.distributed.num_processes = "0,2", 2
    assert _world(build_command(cfg, tmp_path)) == {"localhost": [0, 2]}
    cfg.distributed.devices = ""
    assert _world(build_command(cfg, tmp_path)) == {"localhost": [0, 1]}
    cfg.distributed.master_port = 29611
    cmd = build_command(cfg, tmp_path)
    assert cmd[cmd.index("--master_port") + 1] == "29611"


def test_distributed_checks(default_model):
    cfg = RunConfig()
    cfg.distributed.devices = "0,1"
    cfg.distributed.offload = True
    fields = {f for f, _ in check(cfg)}
    assert {"distributed.num_processes", "distributed.offload"} <= fields
    cfg = RunConfig()
    cfg.model.quantization = "nf4"
    cfg.method.finetuning_type = "full"
    assert "model.quantization" in {f for f, _ in check(cfg)}


def test_cli_reports_problems_in_one_go(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "/nope"}, "method": {"stage": "kto"}}))
    out = subprocess.run([sys.executable, "-m", "engine.cli", "train", str(path), "training.max_steps=3"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "model.path" in out.stderr and "data.datasets[0]" in out.stderr  # kto cannot train on sft data
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------- run directory pieces

def test_jsonl_tail_reads_only_complete_new_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = rundir.JsonlTail(path)
    assert tail.read_new() == []
    rundir.append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2')  # half-written
    assert tail.read_new() == [{"step": 1}]
    assert tail.read_new() == []
    with open(path, "a") as f:
        f.write(', "loss": 1.5}\n')
    assert tail.read_new() == [{"step": 2, "loss": 1.5}]


def test_dead_process_group_reads_as_failed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    rundir.write_status(tmp_path, rundir.Status(state="running", pid=proc.pid, pgid=proc.pid))
    (tmp_path / "train.log").write_text("step 3\nRuntimeError: something broke\n")
    status = rundir.read_status(tmp_path)
    assert status.state == "failed" and "something broke" in status.error
    assert rundir.read_status_raw(tmp_path).state == "running"  # reading a status never writes it (issue 13)


def test_checkpoints_sorted_by_step(tmp_path):
    for n in (10, 2, 100):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert [s for s, _ in rundir.checkpoints(tmp_path)] == [2, 10, 100]
    assert rundir.latest_checkpoint(tmp_path).name == "checkpoint-100"


def test_supervisor_names_a_gpu_the_machine_lacks(tmp_path, monkeypatch):
    """The runner refused a device id beyond the machine's GPUs; launching directly, the supervisor says so itself."""
    from engine.run import hardware, launch

    cfg = RunConfig()
    cfg.distributed.devices, cfg.distributed.num_processes = "0,3", 2
    monkeypatch.setattr(hardware, "gpu_count", lambda: 2)
    assert not launch._devices_present(cfg, tmp_path)
    status = rundir.read_status_raw(tmp_path)
    assert (status.state, status.error_kind) == ("failed", "config")
    assert status.error == "distributed.devices: GPU 3 is not on this machine, which has 2 (ids 0–1)"
    cfg.distributed.devices = "0,1"
    assert launch._devices_present(cfg, tmp_path)
    monkeypatch.setattr(hardware, "gpu_count", lambda: 0)  # no GPU: the ranks run on the CPU, as before
    cfg.distributed.devices = "0,3"
    assert launch._devices_present(cfg, tmp_path)
