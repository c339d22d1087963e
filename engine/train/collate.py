"""Padding-free training batches that project only the trained positions onto the vocabulary.

``DataCollatorWithFlattening`` packs a batch's examples into one row with restarting position ids
and sequence boundaries, so no compute goes to padding. On top of that, the language-model head
(hidden x vocabulary: the largest activation of a small model, ~400 MB for 2,048 tokens of a 49k
vocabulary in fp32, plus as much again for its softmax and gradient) is evaluated only where a
label is trained. transformers' own ``logits_to_keep`` (a boolean mask over positions) selects those
hidden states before ``lm_head``, and ``shift_labels`` gives the loss the matching targets, so the
loss is the same sum over trained tokens divided by ``num_items_in_batch`` as the full computation.
"""

from __future__ import annotations

import inspect

import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

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

