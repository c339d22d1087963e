"""Export on a tiny Llama: merge, verification (an unmerged export must fail), shards, bad inputs, GGUF, hub offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from engine import jobs, rundir
from engine.config import ConfigError
from engine.export import ExportError, check_export, export, greedy
from engine.hub import HubError
from engine.jobconfig import ExportConfig


class _Progress:
    def plan(self, total): pass
    def phase(self, text): pass
    def advance(self, n=1, **row): pass


def make_adapter(base: Path, out: Path, seed: int = 1, rank: int = 4) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, saved like a training checkpoint."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    run_cfg = {"model": {"path": str(base), "quantization": "none"}, "method": {"stage": "sft", "finetuning_type": "lora",
               "lora_rank": rank}, "data": {"datasets": ["identity"]}, "training": {"learning_rate": 1e-3}}
    (out / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("run") / "checkpoint-4")


def _cfg(adapter, out, **output) -> ExportConfig:
    return ExportConfig.model_validate({"model": {"checkpoint": str(adapter)},
                                        "output": {"dir": str(out), "job_dir": str(out.parent / "job"), "dtype": "float32", **output}})


def test_merge_matches_adapter_in_fp32_and_is_loadable(adapter, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = export(_cfg(adapter, tmp_path / "merged", max_shard_size="100KB"), tmp_path, _Progress())
    out = Path(result["output_dir"])
    assert result["verify"]["max_logit_diff"] < 1e-4
    assert result["verify"]["base_vs_adapter"] > 1e-2  # the adapter really changes the logits
    assert result["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "README.md", "config.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert str(tiny_model) in card and "identity" in card and "lora" in card and "learning_rate" in card

    # independently of the job: plain transformers loads it and agrees with the adapter model
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(adapter))
    with torch.no_grad():
        assert (merged(ids).logits - peft(ids).logits).abs().max().item() < 1e-4
    assert greedy(merged, tok, ids, 8) == greedy(peft, tok, ids, 8)


def test_unmerged_export_fails_verification(adapter, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())  # drops the adapter
    with pytest.raises(ExportError, match="unmerged"):
        export(_cfg(adapter, tmp_path / "bad"), tmp_path, _Progress())
    assert not (tmp_path / "bad").exists()


def test_bad_inputs_are_reported_before_work(adapter, tiny_model, default_model, tmp_path, monkeypatch):
    missing = ExportConfig.model_validate({"model": {"checkpoint": str(tmp_path / "nope")}, "output": {"dir": str(tmp_path / "o")}})
    assert "checkpoint not found" in check_export(missing)[0][1]

    wrong_base = _cfg(adapter, tmp_path / "o")
    wrong_base.model.base = str(default_model)
    (field, msg), = check_export(wrong_base)
    assert field == "model.base" and "does not match the base model" in msg and "input size 64 vs base 576" in msg

    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("keep me")
    (field, msg), = check_export(_cfg(adapter, full))
    assert field == "output.dir" and "not empty" in msg and "overwrite" in msg

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root can write anyway
            assert any("not writable" in m for _, m in check_export(_cfg(adapter, locked / "out")))
    finally:
        locked.chmod(0o700)

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert any("not enough disk space" in m and "GB" in m for _, m in check_export(_cfg(adapter, tmp_path / "o2")))


def test_hub_push_offline_fails_once_with_a_clear_message(tmp_path, monkeypatch):
    from engine.hub import push
    from engine.jobconfig import ExportHub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline mode is on"):
        push(ExportHub(repo_id="me/model", token="x"), tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(HubError, match="cannot reach .* not retried"):
        push(ExportHub(repo_id="me/model", token="x", endpoint="http://127.0.0.1:9", timeout_s=2), tmp_path)
    with pytest.raises(HubError, match="needs a token"):
        push(ExportHub(repo_id="me/model"), tmp_path)


def test_export_job_through_the_launcher(adapter, tmp_path):
    cfg = _cfg(adapter, tmp_path / "merged")
    cfg.output.job_dir = str(tmp_path / "job")
    job_dir = jobs.start_job("export", cfg, checks=check_export)
    from engine import launch

    status = launch.wait(job_dir, timeout=240)
    assert status.state == "completed", (status, rundir.log_tail(job_dir))
    result = jobs.read_result(job_dir)
    assert result["verify"]["max_logit_diff"] < 1e-4 and Path(result["output_dir"]).is_dir()
    assert status.step == status.total_steps > 0
    with pytest.raises(ConfigError, match="not empty"):
        jobs.start_job("export", cfg, checks=check_export)
    assert json.loads((job_dir / "status.json").read_text())["kind"] == "export"
