"""Freeze tuning changes only the last N layers; full fine-tuning under DeepSpeed ZeRO-3 and ZeRO-2 with 2 CPU
ranks saves consolidated weights that plain ``from_pretrained`` loads; nonsense combinations are refused first."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.run import launch, rundir
from engine.run.checks import check
from engine.run.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
ZH = "我是 Orion，由 Workbench 团队开发的人工智能助手。"


def _cfg(tiny_model, run_dir, **sections) -> RunConfig:
    data = {
        "model": {"path": str(tiny_model)},
        "data": {"datasets": ["identity"], "registry": str(ROOT / "data" / "dataset_info.yaml"), "cutoff_len": 256},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-2, "save_steps": 2, "logging_steps": 1, "precision": "fp32"},
        "output": {"run_dir": str(run_dir)},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return RunConfig.model_validate(data)


def _run(cfg, timeout=600) -> Path:
    run_dir = launch.start(cfg)
    status = launch.wait(run_dir, timeout=timeout)
    assert status is not None and status.state == "completed", (status, rundir.log_tail(run_dir))
    return run_dir


def _layer(key: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- refused before compute


@pytest.mark.parametrize("change, field, words", [
    ({"method": {"finetuning_type": "freeze", "freeze_trainable_layers": 3}}, "method.freeze_trainable_layers", "only 2 decoder layers"),
    ({"method": {"finetuning_type": "qlora"}, "model": {"quantization": "nf4"}, "distributed": {"zero_stage": 3}},
     "distributed.zero_stage", "ZeRO-3"),
    ({"distributed": {"offload": True}}, "distributed.offload", "ZeRO stage 2 or 3"),
    ({"method": {"finetuning_type": "full"}, "model": {"quantization": "nf4"}}, "model.quantization", "quantized weights"),
    ({"method": {"finetuning_type": "freeze"}, "model": {"quantization": "int8"}}, "model.quantization", "quantized weights"),
])
def test_nonsense_combinations_are_refused(tiny_model, tmp_path, change, field, words):
    problems = check(_cfg(tiny_model, tmp_path / "run", **change))
    assert any(f == field and words in m for f, m in problems), problems


def test_freeze_may_train_every_layer(tiny_model, tmp_path):
    assert check(_cfg(tiny_model, tmp_path / "run", method={"finetuning_type": "freeze", "freeze_trainable_layers": 2})) == []


def test_zero3_configs_save_consolidated_weights():
    for name in ("zero3.json", "zero3_offload.json"):
        cfg = json.loads((ROOT / "configs" / "deepspeed" / name).read_text())
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True, name


# ---------------------------------------------------------------- freeze: only the last N layers change


def test_freeze_changes_only_the_last_layers(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    run_dir = _run(_cfg(tiny_model, tmp_path / "run", method={"finetuning_type": "freeze", "freeze_trainable_layers": 1}))
    layers = AutoConfig.from_pretrained(tiny_model).num_hidden_layers
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(run_dir / "final" / "model.safetensors")
    assert sorted(before) == sorted(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trained = {k for k in before if (_layer(k) or -1) >= layers - 1}
    assert trained and changed == trained, sorted(changed ^ trained)
    # embeddings (tied with lm_head), the final norm and the earlier layers stay exactly as they were
    assert "model.embed_tokens.weight" not in changed and "model.norm.weight" not in changed
    assert "trainable parameters" in (run_dir / "train.log").read_text()
    AutoModelForCausalLM.from_pretrained(run_dir / "final")


# ---------------------------------------------------------------- full fine-tuning under ZeRO with 2 CPU ranks


def _check_consolidated(run_dir: Path, tiny_model: Path, step: int):
    """final/ and checkpoint-<step>/ hold full-size safetensors equal to the trained fp32 weights in the shards,
    and a plain from_pretrained model gives the logits of those weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = run_dir / f"checkpoint-{step}"
    assert (ckpt / f"global_step{step}").is_dir()  # the DeepSpeed shards, for resume
    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    base = load_file(tiny_model / "model.safetensors")
    config = AutoConfig.from_pretrained(run_dir / "final")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    for d in (ckpt, run_dir / "final"):
        saved = load_file(d / "model.safetensors")
        if config.tie_word_embeddings and "lm_head.weight" in saved:  # ZeRO-2 saves the tied matrix twice
            assert torch.equal(saved.pop("lm_head.weight"), saved["model.embed_tokens.weight"]), d
        assert saved.keys() == base.keys(), d
        for k, v in saved.items():
            assert tuple(v.shape) == shapes[k] and v.numel() > 0, (d, k, v.shape)  # not empty ZeRO-3 partitions
            assert torch.equal(v, trained[k]), (d, k)
        assert all(not torch.equal(saved[k], base[k]) for k in saved if saved[k].shape == base[k].shape), d
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_config(config).eval()
    reference.load_state_dict(trained, strict=False)
    reference.tie_weights()
    ids = tok(ZH, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    return tok, loaded


@pytest.mark.slow
def test_full_zero3_two_cpu_ranks_with_extended_vocab(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    cfg = _cfg(tiny_model, tmp_path / "run", method={"finetuning_type": "full"},
               model={"extend_vocab": str(ROOT / "data" / "vocab_zh_demo.txt")},
               distributed={"num_processes": 2, "zero_stage": 3})
    run_dir = _run(cfg)
    log = (run_dir / "train.log").read_text()
    assert "dist_world_size=2" in log and "world size 2" in log
    tok, model = _check_consolidated(run_dir, tiny_model, 2)
    base_len = len(AutoTokenizer.from_pretrained(tiny_model))
    assert len(tok) > base_len and model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok("团队", add_special_tokens=False)["input_ids"][0] >= base_len


@pytest.mark.slow
def test_full_zero2_two_cpu_ranks(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path / "run", method={"finetuning_type": "full"},
               distributed={"num_processes": 2, "zero_stage": 2})
    run_dir = _run(cfg)
    assert "dist_world_size=2" in (run_dir / "train.log").read_text()
    _check_consolidated(run_dir, tiny_model, 2)
