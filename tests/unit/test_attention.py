"""The packed-batch attention: which kernel runs where, and the GPU kernel's math against the per-example loop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.train.attention import FLASH, FLEX, NAME, choose, packed_flex_forward, packed_sdpa_forward, register

FLEX_MOD = "torch.nn.attention.flex_attention"


@pytest.mark.parametrize("device, installed, expected", [
    ("cpu", {"flash_attn", FLEX_MOD}, NAME),  # the loop wherever nothing else runs
    ("cuda", {"flash_attn", FLEX_MOD}, FLASH),
    ("cuda", {FLEX_MOD}, FLEX),
    ("cuda", set(), NAME),
    ("mps", {FLEX_MOD}, NAME),
])
def test_choice(device, installed, expected):
    assert choose(device, frozenset(installed)) == expected


def test_register_picks_the_loop_on_this_cpu():
    assert register("cpu") == NAME


def _inputs(bounds, heads=4, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = bounds[-1]
    q = torch.randn(1, heads, n, dim, generator=g, requires_grad=True)
    k = torch.randn(1, kv_heads, n, dim, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, n, dim, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("bounds", [[0, 9, 22, 28], [0, 200], [0, 1, 130, 131, 300]])
def test_flex_document_mask_matches_per_example_sdpa(bounds, monkeypatch):
    """FlexAttention (run eagerly on the CPU, the same mask and call the GPU compiles) gives the loop's numbers.

    torch refuses flex's backward on a CPU only by a device check; its eager (reference) backward is the
    same autograd formula the GPU kernel implements, so the check is lifted here to compare gradients."""
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *args: None)
    module = SimpleNamespace(training=True, num_key_value_groups=2)
    kw = dict(cu_seq_lens_q=torch.tensor(bounds), cu_seq_lens_k=torch.tensor(bounds), scaling=0.25)
    results = []
    for forward in (packed_sdpa_forward, packed_flex_forward):
        q, k, v = _inputs(bounds)
        out, _ = forward(module, q, k, v, None, **kw)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * weights).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    assert results[0][0].shape == (1, bounds[-1], 4, 16)
    for name, loop, flex in zip(("output", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(flex, loop, rtol=1e-5, atol=1e-5, msg=name)


def test_flex_keeps_examples_apart():
    """Changing the second example leaves the first one's output unchanged (no attention across examples)."""
    module = SimpleNamespace(training=False, num_key_value_groups=2)
    bounds = [0, 10, 25]
    kw = dict(cu_seq_lens_q=torch.tensor(bounds), scaling=None)
    q, k, v = (t.detach() for t in _inputs(bounds))
    a, _ = packed_flex_forward(module, q, k, v, None, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:] += 1.0
    v2[:, :, 10:] -= 1.0
    b, _ = packed_flex_forward(module, q, k2, v2, None, **kw)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_short_16_bit_examples_take_the_fp32_backward_with_the_same_numbers(monkeypatch):
    """bf16 examples below FP32_BACKWARD_BELOW run the CPU flash kernel with its fp32 backward; longer ones plain SDPA.
    Outputs and gradients match the fp32 computation on the same (bf16-rounded) inputs within bf16's precision."""
    import engine.train.attention as attention

    bounds = [0, 7, 120, 120 + attention.FP32_BACKWARD_BELOW + 5, 400]  # 7, 113 and 83 tokens short, 197 long
    calls = []
    apply = attention.CpuFlashAttention.apply
    monkeypatch.setattr(attention.CpuFlashAttention, "apply", lambda q, *a: calls.append(q.shape[2]) or apply(q, *a))
    module = SimpleNamespace(training=True, num_key_value_groups=3)
    kw = dict(cu_seq_lens_q=torch.tensor(bounds), scaling=None)
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (t.detach().to(torch.bfloat16).to(dtype).requires_grad_() for t in _inputs(bounds, 9, 3, 64))
        out, _ = packed_sdpa_forward(module, q, k, v, None, **kw)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out.float() * weights).sum().backward()
        assert out.dtype == q.grad.dtype == k.grad.dtype == dtype
        results.append((out.detach(), q.grad, k.grad, v.grad))
    assert calls == [7, 113, 83]  # the 16-bit run's short examples only
    for name, bf16, fp32 in zip(("output", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(bf16.float(), fp32, rtol=2e-2, atol=2e-2 * fp32.abs().max().item(), msg=name)
