"""Real DeepSpeed-launched runs on a tiny model: metrics, checkpoints, QLoRA, stop, resume, failures."""

from __future__ import annotations

import math
import re
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from engine.run import launch, rundir
from engine.run.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tiny_model, run_dir, **sections) -> RunConfig:
    data = {
        "model": {"path": str(tiny_model)},
        "data": {"datasets": ["identity"], "registry": str(ROOT / "data" / "dataset_info.yaml"), "cutoff_len": 256},
        "training": {"max_steps": 8, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                     "learning_rate": 2e-3, "save_steps": 4, "logging_steps": 1, "precision": "fp32"},
        "output": {"run_dir": str(run_dir)},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return RunConfig.model_validate(data)


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rundir.read_metrics(run_dir) if "loss" in r}


def _run(cfg, timeout=300) -> Path:
    run_dir = launch.start(cfg)
    status = launch.wait(run_dir, timeout=timeout)
    assert status is not None and status.state == "completed", (status, rundir.log_tail(run_dir))
    return run_dir


def test_lora_sft_under_deepspeed(tiny_model, tmp_path):
    run_dir = _run(_cfg(tiny_model, tmp_path / "run"))
    rows = rundir.read_metrics(run_dir)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    last = rows[-1]
    for key in ("step", "total_steps", "epoch", "learning_rate", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "eta_s", "memory_mb"):
        assert key in last, key
    assert last["total_steps"] == 8 and last["tokens"] > 0
    assert [s for s, _ in rundir.checkpoints(run_dir)] == [4, 8]
    ckpt = run_dir / "checkpoint-8"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert "[workbench]" in (run_dir / "train.log").read_text() and "deepspeed" in (run_dir / "train.log").read_text()
    status = rundir.read_status(run_dir)
    assert status.state == "completed" and status.step == 8 and status.pid and status.ended_at
    assert "training batch per device: 4 examples" in (run_dir / "train.log").read_text()
    log = (run_dir / "train.log").read_text()
    assert "gradient checkpointing (auto): off (" in log  # plenty of memory here
    from engine.run.hardware import find_allocator

    # the supervisor preloads tcmalloc (else jemalloc) for CPU ranks where one is installed (.ci/run installs it)
    expected = "tcmalloc" if find_allocator("tcmalloc") else "jemalloc" if find_allocator("jemalloc") else "glibc"
    assert f"memory allocator: {expected}" in log
    assert re.search(r"the outputs of [1-9]\d* norms and [1-9]\d* gated MLPs", log)
    assert re.search(r"start-up: imports [\d.]+ s, data [\d.]+ s, model [\d.]+ s, trainer set-up [\d.]+ s, "
                     r"first step [\d.]+ s", log)
    # the supervisor records the exit code once the whole process group is gone
    deadline = time.time() + 30
    while rundir.read_status(run_dir).exit_code is None and time.time() < deadline:
        time.sleep(0.5)
    assert rundir.read_status(run_dir).exit_code == 0


def test_every_trainable_parameter_changes(tiny_model, tmp_path):
    from safetensors.torch import load_file

    run_dir = _run(_cfg(tiny_model, tmp_path / "run", training={"max_steps": 2, "save_steps": 1}))
    first = load_file(run_dir / "checkpoint-1" / "adapter_model.safetensors")
    last = load_file(run_dir / "checkpoint-2" / "adapter_model.safetensors")
    lora_b = [k for k in last if "lora_B" in k]
    assert lora_b and all(not (first[k] == last[k]).all() for k in last), "every adapter tensor must change"


def test_a_bf16_lora_run_trains_fp32_adapters_over_a_bf16_base(tiny_model, tmp_path):
    """precision bf16 (what auto picks on CPUs with bf16 units, and on GPUs): the frozen base loads as bf16, the
    adapters train and save in fp32, and each adapted layer's input is kept once under autocast."""
    from safetensors.torch import load_file

    run_dir = _run(_cfg(tiny_model, tmp_path / "run", training={"max_steps": 2, "save_steps": 1, "precision": "bf16"}))
    log = (run_dir / "train.log").read_text()
    assert "dtype=torch.bfloat16, compute dtype=torch.bfloat16" in log, log
    assert re.search(r"LoRA layers adding their product in place \(one node over a frozen linear base; input kept once under autocast\): [1-9]\d*", log)
    first = load_file(run_dir / "checkpoint-1" / "adapter_model.safetensors")
    last = load_file(run_dir / "checkpoint-2" / "adapter_model.safetensors")
    assert last and {t.dtype for t in last.values()} == {torch.float32}
    assert all(not torch.equal(first[k], last[k]) for k in last), "every adapter tensor must change"
    assert all(math.isfinite(x) for x in _losses(run_dir).values())


def test_qlora_4bit_run(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path / "run", model={"path": str(tiny_model), "quantization": "nf4"},
               method={"finetuning_type": "qlora"}, training={"max_steps": 3, "save_steps": 3})
    run_dir = _run(cfg)
    assert len(_losses(run_dir)) == 3
    assert (run_dir / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert "quantization=nf4, 4-bit=True" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_qlora_with_paged_adamw_8bit_on_cpu(tiny_model, tmp_path):
    """bitsandbytes pages nothing on a CPU, but its paged 8-bit AdamW runs there; 4-bit compute follows the precision."""
    cfg = _cfg(tiny_model, tmp_path / "run", model={"path": str(tiny_model), "quantization": "nf4"},
               method={"finetuning_type": "qlora"}, training={"max_steps": 3, "save_steps": 3, "optim": "paged_adamw_8bit"})
    run_dir = _run(cfg)
    losses = _losses(run_dir)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses.values())
    assert "4-bit=True, 8-bit=False, dtype=torch.float32, compute dtype=torch.float32" in (run_dir / "train.log").read_text()


def _wait_for_step(run_dir, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step for r in rundir.read_metrics(run_dir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step}: {rundir.log_tail(run_dir)}")


def test_sigterm_stops_with_checkpoint_then_resume_matches_uninterrupted(tiny_model, tmp_path):
    steps = 60
    common = {"max_steps": steps, "save_steps": 1000, "per_device_train_batch_size": 2, "learning_rate": 1e-3}
    reference = _run(_cfg(tiny_model, tmp_path / "ref", training=common))

    run_dir = launch.start(_cfg(tiny_model, tmp_path / "stopped", training=common))
    _wait_for_step(run_dir, 3)
    # only the rank is signalled: DeepSpeed's launcher would SIGKILL it 30 s later, mid-step
    workers = launch._workers(rundir.read_status(run_dir).pgid)
    assert [w.cmdline()[w.cmdline().index("-m") + 1] for w in workers] == ["engine.train"]
    t0 = time.time()
    assert launch.stop(run_dir)
    status = launch.wait(run_dir, timeout=120)
    assert status.state == "stopped", (status, rundir.log_tail(run_dir))
    assert time.time() - t0 < 60
    ckpt = rundir.latest_checkpoint(run_dir)
    assert ckpt is not None and (ckpt / "adapter_model.safetensors").is_file()
    k = int(ckpt.name.split("-")[1])
    assert 3 <= k < steps, k

    cfg = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    cfg.training.resume_from = "latest"
    launch.start(cfg)
    status = launch.wait(run_dir, timeout=300)
    assert status.state == "completed", rundir.log_tail(run_dir)
    resumed, ref = _losses(run_dir), _losses(reference)
    assert max(resumed) == steps
    after = [s for s in range(k + 1, steps + 1)]
    assert all(s in resumed for s in after)
    for s in after:
        assert resumed[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-5), (s, resumed[s], ref[s])


def test_sigkill_shows_failed(tiny_model, tmp_path):
    run_dir = launch.start(_cfg(tiny_model, tmp_path / "run", training={"max_steps": 2000, "save_steps": 5000}))
    _wait_for_step(run_dir, 1)
    assert launch.stop(run_dir, force=True)
    time.sleep(1)
    status = launch.wait(run_dir, timeout=60)
    assert status.state == "failed" and status.error


def test_failure_inside_engine_is_reported(tiny_model, tmp_path):
    # a model directory whose weights are missing passes the checks but fails at load time
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text((Path(tiny_model) / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(tiny_model) / name).exists():
            (broken / name).write_text((Path(tiny_model) / name).read_text())
    run_dir = launch.start(_cfg(broken, tmp_path / "run", model={"path": str(broken)}))
    status = launch.wait(run_dir, timeout=120)
    assert status.state == "failed"
    assert status.error and status.error_kind == "runtime"


# ---------------------------------------------------------------- bad input, before any compute

@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"model": {"path": "/nonexistent/model"}}, "model.path", "not found"),
        ({"model": {"template": "no-such-template"}}, "model.template", "unknown template"),
        ({"data": {"datasets": ["/nonexistent/data.json"]}}, "data.datasets[0]", "no-such"),
        ({"method": {"finetuning_type": "qlora"}}, "model.quantization", "qlora"),
        ({"method": {"stage": "dpo"}}, "data.datasets[0]", "needs preference data"),
        ({"training": {"resume_from": "/nonexistent/checkpoint-3"}}, "training.resume_from", "not a checkpoint"),
    ],
)
def test_bad_config_is_refused_before_compute(tiny_model, tmp_path, change, field, words):
    cfg = _cfg(tiny_model, tmp_path / "run", **change)
    with pytest.raises(ConfigError) as err:
        launch.start(cfg)
    fields = [f for f, _ in err.value.problems]
    assert field in fields, err.value.problems
    if words != "no-such":
        assert any(words in m for f, m in err.value.problems if f == field), err.value.problems
    assert not (tmp_path / "run").exists()


def test_non_empty_run_dir_is_never_reused(tiny_model, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists"):
        launch.start(_cfg(tiny_model, run))
    assert (run / "precious.txt").read_text() == "keep me"


def test_every_problem_reported_at_once(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path / "run", model={"path": "/nope", "template": "nope"}, method={"stage": "kto"})
    with pytest.raises(ConfigError) as err:
        launch.start(cfg)
    fields = {f for f, _ in err.value.problems}
    assert {"model.path", "model.template", "data.datasets[0]"} <= fields


def test_malformed_dataset_line_is_refused_with_its_line(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "broken", \n')
    # refused by the checks before any weights load (issue 13), naming the file and the line
    with pytest.raises(ConfigError) as err:
        launch.start(_cfg(tiny_model, tmp_path / "run", data={"datasets": [str(bad)]}))
    assert "bad.jsonl" in str(err.value) and "line 2" in str(err.value), err.value
    assert not (tmp_path / "run").exists()


def test_quantization_without_bitsandbytes_is_refused(tiny_model, tmp_path, monkeypatch):
    import importlib.util

    from engine.run import checks

    real = importlib.util.find_spec
    monkeypatch.setattr(checks.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cfg = _cfg(tiny_model, tmp_path / "run", model={"path": str(tiny_model), "quantization": "nf4"}, method={"finetuning_type": "qlora"})
    assert any("bitsandbytes" in m for f, m in checks.check(cfg) if f == "model.quantization")


@pytest.mark.slow
def test_zero2_two_cpu_ranks(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path / "run", distributed={"num_processes": 2, "zero_stage": 2},
               training={"max_steps": 4, "save_steps": 4, "batch_by": "tokens"})
    run_dir = _run(cfg, timeout=600)
    log = (run_dir / "train.log").read_text()
    assert "dist_world_size=2" in log and "world size 2" in log
    # token-budget batches under DeepSpeed: each rank its own batches of at most cutoff_len x batch tokens
    assert log.count("batch per device: ≤ 1,024 tokens") == 2
    assert len(_losses(run_dir)) == 4
    assert (run_dir / "checkpoint-4" / "adapter_model.safetensors").is_file()


def test_zero3_lora_two_cpu_ranks_in_bf16(tiny_model, tmp_path):
    """LoRA under ZeRO-3 (bf16, as on GPUs): the partitioned head's weight is gathered once per batch for the chunked
    loss (per-chunk gathers failed checkpoint's recomputation check, and mismatched the ranks' collectives)."""
    from safetensors.torch import load_file

    cfg = _cfg(tiny_model, tmp_path / "run", distributed={"num_processes": 2, "zero_stage": 3},
               training={"max_steps": 2, "save_steps": 2, "precision": "bf16", "per_device_train_batch_size": 8})
    run_dir = _run(cfg, timeout=600)
    log = (run_dir / "train.log").read_text()
    assert "dist_world_size=2" in log
    # the base counted whole, not as the partitions ZeRO-3 holds while loading (it read "16,384 of 16,384 (100.000%)")
    assert log.count("trainable parameters: 16,384 of ") == 2 and "(100.000%)" not in log, log
    losses = _losses(run_dir)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses.values())
    weights = load_file(run_dir / "checkpoint-2" / "adapter_model.safetensors")
    # whole adapter matrices gathered from both ranks, in fp32
    assert len(weights) == 28 and all(min(t.shape) == 8 and t.dtype == torch.float32 for t in weights.values())


def test_stop_right_after_start_reads_stopped(tiny_model, tmp_path):
    run_dir = launch.start(_cfg(tiny_model, tmp_path / "run"))
    time.sleep(1)  # the launcher is still starting: no trainer, no stop handler yet
    assert launch.stop(run_dir)
    status = launch.wait(run_dir, timeout=120)
    deadline = time.time() + 60
    while rundir.read_status(run_dir).exit_code is None and time.time() < deadline:
        time.sleep(0.5)
    assert rundir.read_status(run_dir).state == "stopped", rundir.log_tail(run_dir)
