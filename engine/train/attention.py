"""Varlen SDPA for padding-free training batches.

Training packs a batch's examples into one row (DataCollatorWithFlattening with sequence
boundaries). Plain SDPA then needs a block-diagonal mask over the whole row, which costs
(sum of lengths)^2 attention work and a materialized mask. This attention runs causal SDPA
on each example's slice instead: (sum of length^2) work, no mask, same numbers.
Registered with transformers' attention interfaces as ``packed_sdpa``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "packed_sdpa"


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    bounds = bounds.tolist() if torch.is_tensor(bounds) else list(bounds)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    dropout = dropout if module.training else 0.0
    parts = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                       scale=scaling, is_causal=True, enable_gqa=gqa)
        for s, e in zip(bounds[:-1], bounds[1:])
        if e > s
    ]
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def packed_sdpa_mask(*args, **kwargs):
    # No padding mask means a packed or single causal row: the attention above needs no mask.
    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)
    return NAME
