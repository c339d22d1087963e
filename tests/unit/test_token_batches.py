"""Token-budget batches: never over the budget, every example exactly once per epoch, order fixed by the seed,
each rank its share."""

from __future__ import annotations

import random

import pytest
import torch

from engine.train.collate import TokenBudgetBatches

BUDGET = 4 * 64  # per-device batch 4 x cutoff_len 64


def _lengths(n=203, seed=3):
    rng = random.Random(seed)
    return [rng.randint(3, 64) for _ in range(n)]


def _check_epoch(batches, lengths):
    assert all(sum(lengths[i] for i in b) <= BUDGET for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # none dropped, none repeated


def test_budget_and_every_example_once_per_epoch():
    lengths = _lengths()
    sampler = TokenBudgetBatches(lengths, BUDGET, seed=7)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        _check_epoch(batches, lengths)
        epochs.append(batches)
    assert epochs[0] != epochs[1]  # the order is reshuffled each epoch
    # packed well: no two neighbours in the packing order would have fitted into one batch
    assert len(sampler) <= 2 * sum(lengths) / BUDGET + 1


def test_order_fixed_by_seed():
    lengths = _lengths()
    assert list(TokenBudgetBatches(lengths, BUDGET, seed=7)) == list(TokenBudgetBatches(lengths, BUDGET, seed=7))
    assert list(TokenBudgetBatches(lengths, BUDGET, seed=7)) != list(TokenBudgetBatches(lengths, BUDGET, seed=8))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_disjoint_equal_shares(world):
    lengths = _lengths(n=57)
    ranks = [TokenBudgetBatches(lengths, BUDGET, seed=1, rank=r, world=world) for r in range(world)]
    for epoch in (0, 1):
        shares = []
        for sampler in ranks:
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
        assert len({len(s) for s in shares}) == 1  # every rank runs the same number of steps
        _check_epoch([b for share in shares for b in share], lengths)


def test_example_over_the_budget_is_named():
    with pytest.raises(ValueError, match=r"example 1 has 300 tokens, more than the batch budget of 256"):
        TokenBudgetBatches([10, 300], BUDGET)


def test_trainer_dataloader_batches_within_budget(tiny_model, tmp_path):
    """Through the Trainer (DataLoader + accelerate): packed rows never longer than the budget, all tokens seen."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments

    from engine.train.collate import packed_collator
    from engine.train.loss import PackedTrainer

    lengths = _lengths(n=40)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in lengths]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             remove_unused_columns=False, seed=5)
    trainer = PackedTrainer(model=model, args=args, train_dataset=data, data_collator=packed_collator(model),
                            token_budget=BUDGET)
    seen = [int(batch["input_ids"].shape[1]) for batch in trainer.get_train_dataloader()]
    assert max(seen) <= BUDGET and sum(seen) == sum(lengths)
