"""precision auto: bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPUs without bf16 units; QLoRA computes in it."""

from __future__ import annotations

import pytest
import torch

from engine.run.config import ModelConfig, TrainingConfig
from engine.run import hardware
from engine.train.model_setup import compute_dtype, quantization_config, resolve_precision


@pytest.mark.parametrize("cuda, bf16_gpu, bf16_cpu, expected", [
    (True, True, False, "bf16"), (True, False, False, "fp16"), (False, False, False, "fp32"), (False, False, True, "bf16"),
])
def test_auto_precision(monkeypatch, cuda, bf16_gpu, bf16_cpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "amx_bf16"} if bf16_cpu else {"avx2"})
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


def _lora_model(tiny_model, dtype, dropout=0.0):
    from engine.run.config import MethodConfig
    from engine.train.activations import recompute_cheap_parts
    from engine.train.model_setup import load_base_model, setup_finetuning

    model = load_base_model(ModelConfig(path=str(tiny_model)), dtype, frozen=True)
    model = setup_finetuning(model, MethodConfig(finetuning_type="lora", lora_dropout=dropout), gradient_checkpointing=False)
    recompute_cheap_parts(model)  # as a run trains
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give A a gradient too
            param.data.normal_(std=0.02)
    return model


def _loss_and_grads(model, ids, autocast):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_layers_compute_what_peft_computes(tiny_model, dtype, dropout):
    """Each LoRA layer adds its product in one addmm: the loss and every adapter gradient are PEFT's own (to fp32
    rounding in fp32, to bf16 rounding under bf16 autocast, where the fused sum rounds once instead of twice);
    under autocast the layer's input is kept once, not twice (PEFT's fp32 cast skipped); a disabled adapter still
    goes through PEFT's forward. Without dropout each layer is one autograd node (base and adapter products, their
    sums and gradients together); with it (here in eval mode, to compare) the adapter's product is added by addmm."""
    from engine.train.activations import fused_lora, probe

    model = _lora_model(tiny_model, dtype, dropout)
    if dropout:
        model.eval()
    half = dtype == torch.bfloat16
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(1))
    before, kept_before = _loss_and_grads(model, ids, half), probe(model, autocast=dtype if half else None)
    assert fused_lora(model) == 2 * 7  # every projection of the two layers
    assert fused_lora(model) == 0  # once
    after, kept_after = _loss_and_grads(model, ids, half), probe(model, autocast=dtype if half else None)
    tol = dict(rtol=3e-2, atol=2e-3) if half else dict(rtol=1e-5, atol=1e-6)
    assert after[0] == pytest.approx(before[0], rel=tol["rtol"] / 10)
    for a, b in zip(after[1], before[1]):
        torch.testing.assert_close(a, b, **tol)
    if half:
        assert kept_after < 0.8 * kept_before, (kept_before, kept_after)
    else:
        assert kept_after == kept_before
    with torch.no_grad():
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        x = torch.randn(1, 5, layer.in_features, dtype=dtype)
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            node = layer(x.requires_grad_()).grad_fn
        if dropout:  # the addmm's output, viewed in the input's shape
            node = node.next_functions[0][0]
        assert type(node).__name__ == ("AddmmBackward0" if dropout else "_LoraLinearBackward"), node
        with model.disable_adapter():
            assert torch.equal(layer(x), layer.base_layer(x))
        assert not torch.equal(layer(x), layer.base_layer(x))
        assert torch.isfinite(model(input_ids=ids).logits).all()  # bf16 without autocast: PEFT's own forward


def test_frozen_bf16_products_on_two_threads_run_in_row_blocks_with_the_same_values():
    """On two threads, a bf16 product with a frozen weight whose output is no wider than its input (oneDNN's AMX
    heuristic would run it on one thread) is computed in blocks of ROW_BLOCK rows, to bf16 rounding the same values;
    other widths, fp32 and other thread counts are one product."""
    from engine.train.activations import ROW_BLOCK, _frozen_product

    def products(a, b, bias=None):
        with torch.profiler.profile() as prof:
            out = _frozen_product(a, b, bias)
        calls = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
        expected = a @ b if bias is None else torch.addmm(bias, a, b)
        torch.testing.assert_close(out, expected)
        return calls

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2 * ROW_BLOCK + 37, 768, generator=gen).bfloat16()
    square, wide = torch.randn(768, 640, generator=gen).bfloat16(), torch.randn(768, 1536, generator=gen).bfloat16()
    bias = torch.randn(640, generator=gen).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert products(a, square) == products(a, square, bias) == 3
        assert products(a[:ROW_BLOCK], square) == products(a, wide) == products(a.float(), square.float()) == 1
        torch.set_num_threads(1)
        assert products(a, square) == 1
    finally:
        torch.set_num_threads(threads)
