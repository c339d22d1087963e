"""The one checkpoint resolver: what a directory holds, read without torch, and every checkpoint list of the UI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from engine.run.checkpoint import CheckpointError, resolve, weights_dirs, workspace_checkpoints


def _base(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def _run(ws, name, base, stage="sft", steps=(2, 4), final=True):
    run = ws / "runs" / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(base), "template": "chatml"},
                                                     "method": {"stage": stage}}))
    for d in [f"checkpoint-{s}" for s in steps] + (["final"] if final else []):
        (run / d).mkdir()
        (run / d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/elsewhere"}))
        (run / d / "adapter_model.safetensors").write_bytes(b"")
        (run / d / "tokenizer_config.json").write_text("{}")
    return run


def test_an_adapter_checkpoint_brings_its_base_template_stage_and_step(tmp_path):
    base = _base(tmp_path / "base")
    run = _run(tmp_path / "ws", "a", base)
    ckpt = resolve(run / "checkpoint-4")
    assert (ckpt.kind, ckpt.base, ckpt.template, ckpt.stage, ckpt.step) == ("adapter", base, "chatml", "sft", 4)
    assert ckpt.tokenizer_dir == run / "checkpoint-4" and not ckpt.reward_model
    assert resolve(run, run_means_latest=True).path == run / "final"  # chat/API: a run means its final weights
    with pytest.raises(CheckpointError, match="is a run directory; choose one of its checkpoints"):
        resolve(run)  # eval/export: a run directory is refused
    full = resolve(base)
    assert (full.kind, full.base, full.tokenizer_dir, full.step) == ("full", None, base, None)


def test_refusals_keep_their_sentences(tmp_path):
    base = _base(tmp_path / "base")
    rm = _run(tmp_path / "ws", "rm", base, stage="rm")
    with pytest.raises(CheckpointError, match="is a reward model"):
        resolve(rm / "final")
    assert resolve(rm / "final", generative=False).reward_model
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve(tmp_path / "missing")
    orphan = _run(tmp_path / "ws", "orphan", tmp_path / "gone")
    with pytest.raises(CheckpointError, match="base model of final not found") as err:
        resolve(orphan / "final")
    assert err.value.field == "model.base"
    empty = _run(tmp_path / "ws", "empty", base, steps=(), final=False)
    with pytest.raises(CheckpointError, match="has no checkpoint or final weights yet"):
        resolve(empty, run_means_latest=True)


def test_every_checkpoint_list_comes_from_the_resolver(tmp_path):
    base = _base(tmp_path / "base")
    ws = tmp_path / "ws"
    lm = _run(ws, "lm", base)
    rm = _run(ws, "rm", base, stage="rm", steps=(3,), final=False)
    assert [(s, p.name) for s, p in weights_dirs(lm)] == [(None, "final"), (4, "checkpoint-4"), (2, "checkpoint-2")]
    assert workspace_checkpoints(ws) == [("lm/final", str(lm / "final")), ("lm/checkpoint-4", str(lm / "checkpoint-4")),
                                         ("lm/checkpoint-2", str(lm / "checkpoint-2"))]
    assert workspace_checkpoints(ws, reward=True) == [("rm/checkpoint-3", str(rm / "checkpoint-3"))]


def test_the_resolver_imports_no_torch():
    code = "import sys, engine.run.checkpoint, engine.run.jobchecks, engine.run.queue, engine.run.launch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
