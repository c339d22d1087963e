"""LoRA variants, LoRA+, NEFTune and rope scaling reach PEFT and transformers: each field is read back from what the
run saved (adapter_config.json, training_args.bin, the optimizer state), after 3 real steps on the tiny model."""

from __future__ import annotations

import json
import math

import torch

from engine.run import rundir
from test_train import _cfg, _losses, _run


def test_dora_rslora_loraplus_neftune_train_and_are_saved(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path / "run",
               method={"use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 16.0},
               training={"max_steps": 3, "save_steps": 3, "neftune_noise_alpha": 5.0, "lr_scheduler_type": "constant"})
    run_dir = _run(cfg)
    assert all(math.isfinite(x) for x in _losses(run_dir).values()) and len(_losses(run_dir)) == 3
    ckpt = run_dir / "checkpoint-3"
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True and adapter["use_rslora"] is True
    assert torch.load(ckpt / "training_args.bin", weights_only=False).neftune_noise_alpha == 5.0
    # LoRA+: the B matrices (and DoRA's magnitudes) step at 16 x the learning rate of the A matrices
    groups = torch.load(ckpt / "optimizer.pt", weights_only=False)["param_groups"]
    rates = sorted({g["lr"] for g in groups if g["params"]})
    assert rates == [2e-3, 2e-3 * 16]


def test_pissa_trains_and_final_adapter_fits_the_original_base_with_rope_scaling(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path / "run", method={"init_lora_weights": "pissa", "lora_rank": 4},
               model={"path": str(tiny_model), "rope_scaling": "yarn", "rope_factor": 2.0},
               training={"max_steps": 3, "save_steps": 3})
    run_dir = _run(cfg)
    assert len(_losses(run_dir)) == 3
    assert json.loads((run_dir / "checkpoint-3" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    # the final adapter was converted against the kept start: a plain LoRA of rank 2r over the unchanged base
    final = json.loads((run_dir / rundir.FINAL / "adapter_config.json").read_text())
    assert final["r"] == 8 and final["init_lora_weights"] is True
    assert "rope scaling yarn x2: context 2048 -> 4096 tokens" in (run_dir / rundir.LOG).read_text()
