"""precision auto: bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPUs without bf16 units; QLoRA computes in it."""

from __future__ import annotations

import pytest
import torch

from engine.run.config import ModelConfig, TrainingConfig
from engine.train import model_setup
from engine.train.model_setup import compute_dtype, quantization_config, resolve_precision


@pytest.mark.parametrize("cuda, bf16_gpu, bf16_cpu, expected", [
    (True, True, False, "bf16"), (True, False, False, "fp16"), (False, False, False, "fp32"), (False, False, True, "bf16"),
])
def test_auto_precision(monkeypatch, cuda, bf16_gpu, bf16_cpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    monkeypatch.setattr(model_setup, "cpu_has_bf16", lambda: bf16_cpu)
    assert resolve_precision(TrainingConfig()) == expected
    assert resolve_precision(TrainingConfig(precision="fp32")) == "fp32"  # a chosen precision is kept


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_qlora_computes_in_the_run_precision(precision, dtype):
    q = quantization_config(ModelConfig(quantization="nf4", double_quant=True), compute_dtype(precision))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == dtype
