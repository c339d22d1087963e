"""The trained-positions collator gives the same loss and gradients as projecting every position."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

from engine.train.attention import register
from engine.train.collate import TrainedLogitsCollator, accepts_logits_to_keep, packed_collator


def _features():
    g = torch.Generator().manual_seed(0)
    feats = []
    for n, prompt in ((9, 4), (13, 7), (6, 5)):
        ids = torch.randint(10, 1000, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return feats


def _loss_and_grads(model, batch):
    model.zero_grad()
    n = int((batch["labels"][:, 1:] != -100).sum())
    out = model(**batch, num_items_in_batch=torch.tensor(n))
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_same_loss_and_grads_as_full_projection(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=register())
    model.config.use_cache = False
    assert accepts_logits_to_keep(model)
    assert isinstance(packed_collator(model), TrainedLogitsCollator)
    feats = _features()
    full = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=True)(feats)
    kept = packed_collator(model)(feats)
    trained = sum(sum(1 for x in f["labels"][1:] if x != -100) for f in feats)
    assert kept["logits_to_keep"].sum() == trained == kept["shift_labels"].numel()

    out_full, g_full = _loss_and_grads(model, full)
    out_kept, g_kept = _loss_and_grads(model, kept)
    assert out_kept.logits.shape[0] == trained  # only trained positions reach the vocabulary projection
    assert out_full.logits.shape[1] == sum(len(f["input_ids"]) for f in feats)
    torch.testing.assert_close(out_kept.loss, out_full.loss, rtol=1e-5, atol=1e-6)
    assert g_full.keys() == g_kept.keys() and g_full
    for name in g_full:
        torch.testing.assert_close(g_kept[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_batch_without_trained_tokens_keeps_valid_shapes():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}]
    batch = TrainedLogitsCollator(return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=True)(feats)
    assert batch["logits_to_keep"].sum() == 1 and batch["shift_labels"].tolist() == [-100]
