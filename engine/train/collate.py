"""Padding-free training batches that project only the trained positions onto the vocabulary.

``DataCollatorWithFlattening`` packs a batch's examples into one row with restarting position ids
and sequence boundaries, so no compute goes to padding. On top of that, the language-model head
(hidden x vocabulary: the largest activation of a small model, ~400 MB for 2,048 tokens of a 49k
vocabulary in fp32, plus as much again for its softmax and gradient) is evaluated only where a
label is trained. transformers' own ``logits_to_keep`` (a boolean mask over positions) selects those
hidden states before ``lm_head``, and ``shift_labels`` gives the loss the matching targets, so the
loss is the same sum over trained tokens divided by ``num_items_in_batch`` as the full computation.

:class:`TokenBudgetBatches` (``training.batch_by: tokens``) fills each batch to a token budget instead of a count of
examples, so the size of a step, and its memory, no longer swings with the lengths of the examples drawn.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening
from transformers.trainer_pt_utils import BatchRebalanceSampler

IGNORE = -100


class TrainedLogitsCollator(DataCollatorWithFlattening):
    """Flattening collator that adds ``logits_to_keep`` (trained positions) and ``shift_labels``."""

    def __call__(self, features, return_tensors=None, separator_id=None):
        batch = super().__call__(features, return_tensors, separator_id)
        shifted = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]
        keep = shifted != IGNORE
        if not bool(keep.any()):  # nothing trained in this batch: keep one ignored position so shapes stay valid
            keep[0, 0] = True
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = shifted[keep]
        return batch


def accepts_logits_to_keep(model) -> bool:
    """Whether the (unwrapped) causal LM's forward takes ``logits_to_keep`` (most transformers 5 decoders do)."""
    base = model
    if hasattr(base, "get_base_model"):  # PEFT
        base = base.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def packed_collator(model):
    """The training collator for causal-LM stages (SFT, PT)."""
    cls = TrainedLogitsCollator if accepts_logits_to_keep(model) else DataCollatorWithFlattening
    return cls(return_position_ids=True, separator_id=IGNORE, return_flash_attn_kwargs=True)



class TokenBudgetBatches(BatchRebalanceSampler):
    """Batches packed to a token budget: examples are taken in a seeded shuffle and added to the current batch while
    its tokens stay within ``budget`` (cutoff_len x per_device_train_batch_size), so the largest batch, and with it the
    activation peak, is known before training and stays the same from step to step.

    Every example is in exactly one batch of an epoch (none dropped, none repeated); the batches are formed once from
    ``seed`` and their order is reshuffled each epoch from ``seed + epoch``. With several ranks the batch count is made a
    multiple of the world size by splitting the largest batches, and rank r takes batches r, r + world, ...: each rank
    its share, every rank the same number of steps.

    It subclasses transformers' BatchRebalanceSampler only because that is the class Trainer hands to the DataLoader as
    a ``batch_sampler`` and does not shard again (this sampler is rank-aware itself); none of its logic is used.
    """

    def __init__(self, lengths: list[int], budget: int, seed: int = 42, rank: int = 0, world: int = 1):
        too_long = [i for i, n in enumerate(lengths) if n > budget]
        if too_long:
            raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than the batch budget of "
                             f"{budget}")
        self.lengths, self.budget, self.seed, self.rank, self.world, self.epoch = list(lengths), budget, seed, rank, world, 0
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        batches, current, used = [], [], 0
        for i in order:
            if current and used + lengths[i] > budget:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += lengths[i]
        if current:
            batches.append(current)
        while len(batches) % world and any(len(b) > 1 for b in batches):
            big = max(range(len(batches)), key=lambda k: (sum(lengths[i] for i in batches[k]) if len(batches[k]) > 1 else -1))
            half = len(batches[big]) // 2
            batches[big:big + 1] = [batches[big][:half], batches[big][half:]]
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch, in order."""
        shuffle = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return [self.batches[k] for k in shuffle.tolist()][self.rank::self.world]

    def __iter__(self):
        yield from self.epoch_batches()

    def __len__(self) -> int:
        return len(range(self.rank, len(self.batches), self.world))
