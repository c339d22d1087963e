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


def _cfg(**sections):
    from engine.run.config import RunConfig

    return RunConfig.model_validate(sections)


def test_a_frozen_base_loads_in_bf16_where_the_run_computes_in_bf16(tiny_model):
    """LoRA's base stays frozen and its products round it to bf16 anyway: it loads as bf16 (half the bytes), the
    adapters stay fp32. Full and freeze tuning, and LoRA runs that train 16-bit weights too, load fp32 on a CPU."""
    from engine.run.config import MethodConfig
    from engine.train.model_setup import frozen_base, load_base_model, resolve_dtype, setup_finetuning

    assert frozen_base(_cfg(method={"finetuning_type": "lora"})) and frozen_base(_cfg(method={"finetuning_type": "qlora"}))
    assert not frozen_base(_cfg(method={"finetuning_type": "full"}))
    assert not frozen_base(_cfg(method={"finetuning_type": "freeze"}))
    assert not frozen_base(_cfg(method={"modules_to_save": "lm_head"}))
    assert not frozen_base(_cfg(model={"extend_vocab": "tokens.txt"}))
    assert not frozen_base(_cfg(method={"stage": "rm"}), head="score")
    assert resolve_dtype(ModelConfig(), torch.bfloat16) == torch.bfloat16
    assert resolve_dtype(ModelConfig(), None) == torch.float32  # not frozen, or not computing in bf16
    assert resolve_dtype(ModelConfig(), torch.float32) == torch.float32
    assert resolve_dtype(ModelConfig(dtype="float32"), torch.bfloat16) == torch.float32  # a chosen dtype is kept

    model = load_base_model(ModelConfig(path=str(tiny_model)), torch.bfloat16, frozen=True)
    assert model.dtype == torch.bfloat16
    model = setup_finetuning(model, MethodConfig(finetuning_type="lora"), gradient_checkpointing=False)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32} and all("lora_" in n for n in trained)
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert load_base_model(ModelConfig(path=str(tiny_model)), torch.bfloat16).dtype == torch.float32


def test_lora_inputs_are_kept_once_under_autocast_and_no_value_changes(tiny_model):
    """PEFT casts a LoRA layer's input to fp32 and autocast casts it back: with the cast skipped under autocast one copy
    less is kept, and the loss and every gradient stay bit-identical; outside autocast PEFT casts as before."""
    from engine.run.config import MethodConfig
    from engine.train.activations import lora_inputs_once, probe, recompute_cheap_parts
    from engine.train.model_setup import load_base_model, setup_finetuning

    model = load_base_model(ModelConfig(path=str(tiny_model)), torch.bfloat16, frozen=True)
    model = setup_finetuning(model, MethodConfig(finetuning_type="lora"), gradient_checkpointing=False)
    recompute_cheap_parts(model)  # as a run trains
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give A a gradient too
            param.data.normal_(std=0.02)
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    before, kept_before = loss_and_grads(), probe(model, autocast=torch.bfloat16)
    assert lora_inputs_once(model) == 2 * 7  # every projection of the two layers
    after, kept_after = loss_and_grads(), probe(model, autocast=torch.bfloat16)
    assert after[0] == before[0] and all(torch.equal(a, b) for a, b in zip(after[1], before[1]))
    assert kept_after < 0.8 * kept_before, (kept_before, kept_after)
    with torch.no_grad():  # no autocast: the bf16 input still meets the fp32 adapter through PEFT's cast
        assert torch.isfinite(model(input_ids=ids).logits).all()
