"""Resume a ZeRO-2 LoRA run on another number of ranks: the launcher converts the checkpoint to DeepSpeed's universal
format beside its shards (which stay as they are), and training continues as the uninterrupted run did."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from engine.run import launch, rundir
from tests.engine.test_train import _cfg, _losses, _run

# the same global batch (4) on 2 ranks x 2 and 1 rank x 4: the same examples per step, so the same losses
SHAPES = {2: {"num_processes": 2}, 1: {"num_processes": 1}}
BATCH = {2: 2, 1: 4}


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [(2, 1), pytest.param(1, 2, marks=pytest.mark.heavy)])
def test_zero2_checkpoint_resumes_on_another_world_size(tiny_model, tmp_path, monkeypatch, saved, resumed):
    monkeypatch.setenv("WORKBENCH_THREADS", "1")
    training = {"max_steps": 4, "save_steps": 2, "lr_scheduler_type": "constant", "learning_rate": 5e-3}

    def cfg(run_dir, ranks, **extra):
        return _cfg(tiny_model, run_dir, distributed={"zero_stage": 2, **SHAPES[ranks]},
                    training={**training, "per_device_train_batch_size": BATCH[ranks], **extra})

    reference = _run(cfg(tmp_path / "ref", saved), timeout=900)
    ref = _losses(reference)
    # the run as it was at step 2: its checkpoint and its first two metrics rows
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(reference / "checkpoint-2", run_dir / "checkpoint-2")
    rows = [line for line in (reference / rundir.METRICS).read_text().splitlines() if json.loads(line)["step"] <= 2]
    (run_dir / rundir.METRICS).write_text("".join(f"{line}\n" for line in rows))
    shards = run_dir / "checkpoint-2" / "global_step2"
    before = _digest(shards)

    resumed_dir = _run(cfg(run_dir, resumed, resume_from="latest"), timeout=900)
    log = (resumed_dir / rundir.LOG).read_text()
    assert f"checkpoint-2 was saved by {saved} ranks and this run has {resumed}: converting it" in log
    assert "DeepSpeed universal checkpoint" in log
    assert _digest(shards) == before  # the original shards are untouched
    assert (run_dir / "checkpoint-2" / "global_step2_universal").is_dir()
    assert (run_dir / "checkpoint-2" / "latest_universal").read_text().strip() == "global_step2_universal"
    losses = _losses(resumed_dir)
    assert sorted(losses) == [1, 2, 3, 4]
    # step 3 starts from the restored weights; step 4 also needs the restored Adam moments and step count
    for step in (3, 4):
        assert losses[step] == pytest.approx(ref[step], rel=1e-5), (step, losses, ref)
    assert [s for s, _ in rundir.checkpoints(resumed_dir)] == [2, 4]


def test_a_zero_checkpoint_without_zero_is_refused_with_the_reason(tiny_model, tmp_path):
    from engine.run.config import ConfigError

    ckpt = tmp_path / "run" / "checkpoint-2"
    (ckpt / "global_step2").mkdir(parents=True)
    for rank in (0, 1):
        (ckpt / "global_step2" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (ckpt / "trainer_state.json").write_text('{"global_step": 2, "epoch": 0.1}')
    with pytest.raises(ConfigError) as err:
        launch.prepare(_cfg(tiny_model, tmp_path / "run", training={"max_steps": 4, "resume_from": "latest"}))
    [(field, msg)] = err.value.problems
    assert field == "distributed.zero_stage" and "checkpoint-2 holds DeepSpeed ZeRO optimizer shards (2 ranks)" in msg
