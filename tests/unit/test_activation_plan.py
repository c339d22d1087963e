"""gradient_checkpointing: auto checkpoints the fewest layers that keep a batch's activations within the budget."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

from engine.run.config import RunConfig
from engine.train.activations import apply_auto, estimate, plan, probe, saved_bytes
from engine.train.attention import register

TOKENS = 384


def test_plan_takes_the_fewest_checkpointed_layers_that_fit():
    per_layer, hidden, layers = 1000.0, 100, 12
    full = estimate(per_layer, hidden, layers, TOKENS, 0)
    assert plan(per_layer, hidden, layers, TOKENS, full).every_n_layers == 0  # fits: no checkpointing
    assert plan(per_layer, hidden, layers, TOKENS, 1).every_n_layers == 1  # nothing fits: every layer
    budget = int(full * 0.85)
    middle = plan(per_layer, hidden, layers, TOKENS, budget)
    assert middle.every_n_layers == 3 and middle.estimate <= budget  # layers 0, 3, 6, 9
    assert estimate(per_layer, hidden, layers, TOKENS, 4) > budget  # three checkpointed layers would not fit


@pytest.fixture(scope="module")
def six_layers(tiny_model):
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_hidden_layers, config.use_cache = 6, False
    config._attn_implementation = register()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _activations(model, every: int) -> int:
    """Bytes saved for the backward pass by a training forward of TOKENS tokens, checkpointing every ``every``-th layer."""
    if every:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every)
    else:
        model.gradient_checkpointing_disable()
    model.train()
    ids = torch.randint(0, 1000, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    try:
        return saved_bytes(model, lambda: model.model(input_ids=ids, position_ids=torch.arange(TOKENS)[None]))
    finally:
        model.gradient_checkpointing_disable()


def test_auto_plan_stays_under_the_budget_on_the_tiny_model(six_layers):
    model = six_layers
    per_layer = probe(model)
    layers, hidden_bytes = 6, model.config.hidden_size * 4
    full = _activations(model, 0)
    assert per_layer * TOKENS * layers == pytest.approx(full, rel=0.05)  # the one-layer probe predicts the whole
    for share in (1.0, 0.8, 0.45, 0.25):
        budget = int(full * share)
        chosen = plan(per_layer, hidden_bytes, layers, TOKENS, budget)
        assert _activations(model, chosen.every_n_layers) <= budget, (share, chosen)
    assert plan(per_layer, hidden_bytes, layers, TOKENS, int(full * 0.8)).every_n_layers > 1  # selective, not all


def test_apply_auto_sets_the_trainer_arguments(six_layers, tmp_path, monkeypatch):
    from engine.train import activations

    monkeypatch.setattr(activations, "held_now", lambda device, model=None: 10**9)  # RSS moves under pytest: the plan's input is fixed
    per_token = probe(six_layers) * 6
    extras = activations.step_extras(six_layers, "adamw_torch")
    from engine.train.loss import CHUNK_BYTES

    # every parameter of this model trains: an fp32 gradient and AdamW's two fp32 moments each, and a loss chunk
    assert extras == sum(p.numel() * 12 for p in six_layers.parameters()) + 3 * CHUNK_BYTES
    most = per_token * 128 * 0.8  # 80% of the activations of a 2 x 64-token batch
    memory_gb = (10**9 + extras + activations.CPU_FIXED + activations.CPU_SLACK * most) / 1e9
    cfg = RunConfig.model_validate({"data": {"cutoff_len": 64}, "training": {
        "per_device_train_batch_size": 2, "memory_gb": memory_gb}})
    assert cfg.training.gradient_checkpointing == "auto"
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    said = apply_auto(args, six_layers, cfg)
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs["use_reentrant"] is False
    assert args.gradient_checkpointing_kwargs["every_n_layers"] > 1, said  # selective: most of the activations fit
    assert "1.00 GB held at start" in said and f"memory_gb {memory_gb:g}" in said
    tight = cfg.model_copy(update={"training": cfg.training.model_copy(update={"memory_gb": 1.5})})
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    assert apply_auto(args, six_layers, tight).startswith("every layer")  # less than what is held: all it can do
    roomy = cfg.model_copy(update={"training": cfg.training.model_copy(update={"memory_gb": 50.0})})
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    assert apply_auto(args, six_layers, roomy).startswith("off") and not args.gradient_checkpointing
    assert RunConfig.model_validate({"training": {"gradient_checkpointing": True}}).training.gradient_checkpointing == "on"
    dpo = RunConfig.model_validate({"method": {"stage": "dpo"}})
    assert apply_auto(SimpleNamespace(), six_layers, dpo).startswith("off (planned for sft, pt")


def test_held_now_counts_weights_mapped_from_their_file(tmp_path):
    """safetensors weights on a CPU are mapped from the file: the plan counts them before the first step reads them."""
    import psutil
    from safetensors.torch import load_file, save_file

    from engine.train.activations import held_now

    save_file({"w": torch.ones(64 * 2**20 // 4)}, str(tmp_path / "w.safetensors"))  # 64 MiB
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(load_file(str(tmp_path / "w.safetensors"))["w"], requires_grad=False)
    before = psutil.Process().memory_info().rss
    assert held_now(torch.device("cpu")) - before < 16 * 2**20  # not read yet: not in the RSS
    assert held_now(torch.device("cpu"), model) - before > 48 * 2**20


def test_cheap_recompute_keeps_less_and_changes_nothing(tiny_model):
    """Within cheap_recompute the norms' outputs and the gated MLP's act(gate) * up are recomputed in the backward
    pass: 2 x hidden + 2 x intermediate values less per token per layer (act(gate) and the product), the same loss
    to the bit and the same gradients to fp32 rounding (Llama here, full fine-tuning; the Qwen2, Mistral and Gemma
    runs of tests/engine/test_family_runs.py train so)."""
    import copy

    from engine.train.activations import cheap_recompute, recompute_cheap_parts

    config = AutoConfig.from_pretrained(tiny_model)
    config.num_hidden_layers, config.use_cache = 2, False
    config._attn_implementation = register()
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config).train()
    patched = copy.deepcopy(plain)
    assert recompute_cheap_parts(patched) == (4, 2) and recompute_cheap_parts(patched) == (4, 2)  # again: same
    ids = torch.randint(0, config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(2))

    def run(model):
        model.zero_grad()
        with cheap_recompute():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (loss_a, grads_a), (loss_b, grads_b) = run(plain), run(patched)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:  # the norms' own backward pass (activations._RMSNorm) rounds differently from autograd's
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6)
    saved = [saved_bytes(m, lambda m=m: m.model(input_ids=ids, position_ids=torch.arange(TOKENS)[None]))
             for m in (plain, patched)]
    # fp32 values: the two norms' outputs, act(gate) and the product; and the norms' normalised values, which
    # autograd keeps for a trained weight's gradient and activations._RMSNorm recomputes from the input it keeps
    per_layer = 4 * config.hidden_size + 2 * config.intermediate_size
    assert saved[0] - saved[1] == 2 * TOKENS * per_layer * 4
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, patched(input_ids=ids).logits)

    # and the tensors are really let go: after the forward pass (the graph alive) no norm output and no input of
    # down_proj is left, where the plain model keeps every one
    def alive_after_forward(model):
        import weakref

        refs = []
        hooks = [m.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
                 for n, m in model.named_modules() if n.endswith("norm") and ".layers." in n]
        hooks += [m.register_forward_pre_hook(lambda m, i: refs.append(weakref.ref(i[0])))
                  for n, m in model.named_modules() if n.endswith("down_proj")]
        with cheap_recompute():
            loss = model(input_ids=ids, labels=ids).loss
        for hook in hooks:
            hook.remove()
        alive = sum(r() is not None for r in refs)
        loss.backward()
        return alive, len(refs)
    assert alive_after_forward(plain) == (6, 6) and alive_after_forward(patched) == (0, 6)

    # act(gate) is recomputed once in the backward pass, for the product's recomputation and its own backward both
    calls = []
    for layer in patched.model.layers:
        layer.mlp.act_fn.register_forward_hook(lambda *args: calls.append(1))
    patched.zero_grad()
    with cheap_recompute():
        loss = patched(input_ids=ids, labels=ids).loss
    assert len(calls) == 2  # the forward pass, one per layer
    loss.backward()
    assert len(calls) == 4 and torch.equal(loss.detach(), loss_a)