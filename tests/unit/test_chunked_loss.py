"""The chunked linear + cross-entropy loss equals the plain loss and its gradients (fp32, within 1e-5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, TrainingArguments

from engine.train.attention import register
from engine.train.collate import packed_collator
from engine.train.loss import PackedTrainer, supports_chunked_loss, token_loss_sum

TOL = dict(rtol=1e-5, atol=1e-5)


def _case(n=37, hidden=16, vocab=101, bias=True):
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g))
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[::5] = -100  # some positions are not trained
    return head, h, target


def _grads(head, h, loss):
    head.zero_grad()
    h.grad = None
    (loss * 0.37).backward()  # a scale on the way back, as the Trainer's division gives
    return [h.grad.clone()] + [p.grad.clone() for p in head.parameters()]


def _plain(head, h, target):
    return F.cross_entropy(head(h).float(), target, ignore_index=-100, reduction="sum")


def test_fused_head_loss_and_grads_equal_plain():
    head, h, target = _case()
    want = _plain(head, h, target)
    want_grads = _grads(head, h, want)
    got = token_loss_sum(head, h, target, rows=8)  # five chunks, the last one short
    got_grads = _grads(head, h, got)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_fused_head_where_the_targets_probability_underflows():
    """A target far below the top logits (probability under fp32's range): its loss comes from the log-sum-exp."""
    head, h, target = _case(bias=False)
    with torch.no_grad():
        head.weight.mul_(40.0)
    want = _plain(head, h, target)
    assert want.item() > 1000  # some targets' softmax is 0 in fp32
    want_grads = _grads(head, h, want)
    got = token_loss_sum(head, h, target, rows=8)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(_grads(head, h, got), want_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_fused_head_in_bf16_matches_the_plain_loss_of_bf16_logits():
    """A bf16 head and hidden states: the logits are bf16 products (as F.linear gives them), the softmax fp32."""
    head, h, target = _case(bias=False)
    head = head.to(torch.bfloat16)
    hb = h.detach().to(torch.bfloat16).requires_grad_()
    want = F.cross_entropy(head(hb).float(), target, ignore_index=-100, reduction="sum")
    (want_h,) = torch.autograd.grad(want, hb)
    got = token_loss_sum(head, hb, target, rows=8)
    (got_h,) = torch.autograd.grad(got, hb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_h.float(), want_h.float(), rtol=1e-2, atol=1e-2)


def test_wrapped_head_uses_checkpointed_chunks_with_equal_grads():
    head, h, target = _case(bias=False)
    wrapped = torch.nn.Sequential(head)  # not a plain Linear: each chunk is recomputed in the backward pass
    want = _plain(head, h, target)
    want_grads = _grads(head, h, want)
    got = token_loss_sum(wrapped, h, target, rows=8)
    assert got.grad_fn is not None
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(_grads(head, h, got), want_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_frozen_head_and_no_grad():
    head, h, target = _case()
    head.requires_grad_(False)
    want = _plain(head, h, target)
    (want_h,) = torch.autograd.grad(want, h)
    got = token_loss_sum(head, h, target, rows=8)
    (got_h,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(got_h, want_h, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(token_loss_sum(head, h, target, rows=8), want.detach(), **TOL)


def _features():
    g = torch.Generator().manual_seed(0)
    feats = []
    for n, prompt in ((9, 4), (13, 7), (6, 5), (21, 3)):
        ids = torch.randint(10, 1000, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return feats


def test_trainer_loss_and_model_grads_equal_model_loss(tiny_model, tmp_path):
    """PackedTrainer.compute_loss against the model's own loss on the same packed batch (tied embeddings:
    the head's gradient flows into the input embedding too)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=register())
    model.config.use_cache = False
    assert supports_chunked_loss(model)
    batch = packed_collator(model)(_features())
    n = torch.tensor(int((batch["shift_labels"] != -100).sum()))
    trainer = PackedTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    want = model(**batch, num_items_in_batch=n).loss
    want_grads = grads(want)
    got, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=n)
    assert outputs.logits.shape[0] == 0  # no position reached the vocabulary inside the model
    got_grads = grads(got)
    torch.testing.assert_close(got, want, **TOL)
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **TOL, msg=name)


def test_scaled_logits_keep_the_models_own_loss(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config.final_logit_softcapping = 30.0  # a Gemma-2 style cap after the head: only the model applies it
    assert not supports_chunked_loss(model)
