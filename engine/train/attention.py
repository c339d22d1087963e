"""Varlen attention for padding-free training batches.

Training packs a batch's examples into one row (DataCollatorWithFlattening with sequence
boundaries ``cu_seq_lens``). Plain SDPA then needs a block-diagonal mask over the whole row, which
costs (sum of lengths)^2 attention work and a materialized mask. The kernels here attend within
each example only, with the same numbers:

- ``flash_attention_2``: transformers' own varlen path, when the flash_attn package is installed (CUDA);
- ``packed_flex``: FlexAttention with a document (block-diagonal causal) mask built from cu_seq_lens,
  compiled once with dynamic shapes (CUDA; one kernel for the whole row, fully masked blocks skipped);
- ``packed_sdpa``: causal SDPA on each example's slice, one kernel per example (CPU, where nothing
  else runs: flex is only compiled for GPUs and eager flex materializes the scores). On the CPU, 16-bit
  examples shorter than :data:`FP32_BACKWARD_BELOW` run the same flash kernel with its fp32 backward pass.

:func:`choose` picks one from the device and the installed packages; :func:`register` makes them known to
transformers' attention interfaces and returns the choice.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "packed_sdpa"
FLEX = "packed_flex"
FLASH = "flash_attention_2"


def choose(device: str, installed: set[str] | frozenset[str]) -> str:
    """The attention for packed batches on ``device`` ('cuda', 'cpu', ...) given the importable packages / modules."""
    if device != "cuda":
        return NAME
    if "flash_attn" in installed:
        return FLASH
    if "torch.nn.attention.flex_attention" in installed:
        return FLEX
    return NAME


def installed_kernels() -> frozenset[str]:
    """Which of the packages :func:`choose` looks at can be imported here."""
    names = ("flash_attn", "torch.nn.attention.flex_attention")
    found = set()
    for name in names:
        try:
            if importlib.util.find_spec(name) is not None:
                found.add(name)
        except ImportError:
            pass
    return frozenset(found)


def _packed(kwargs, query, key, attention_mask) -> list[int] | None:
    """The example boundaries of a packed single-row batch without a padding mask, else None."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    return bounds.tolist() if torch.is_tensor(bounds) else list(bounds)


# PyTorch's CPU flash attention works in blocks of 32 queries below 192 tokens and of 64 from 192. Its 16-bit backward
# makes five oneDNN products per block and head, and with 32-query blocks their fixed cost dominates. Measured for the
# default model's heads (9 query, 3 key/value, 64 wide, 2 threads, tcmalloc), 16-bit backward against fp32 backward on
# upcast copies: 0.23 against 0.05 ms at 16 tokens, 0.99 against 0.61 at 128, 1.66 against 1.30 at 176; at 192 the
# 16-bit one catches up (1.03 against 1.06) and pulls ahead above. So shorter examples take the fp32 backward, which is
# also the more exact one.
FP32_BACKWARD_BELOW = 192


class CpuFlashAttention(torch.autograd.Function):
    """Causal flash attention on the CPU (the kernel SDPA picks there), with its backward pass run in fp32."""

    @staticmethod
    def forward(ctx, query, key, value, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scale)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, lse = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), query.float(), key.float(), value.float(), out.float(), lse, 0.0, True, scale=ctx.scale)
        return (*(g.to(query.dtype) for g in grads), None)


def _attend(q, k, v, dropout, scaling, gqa):
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.shape[2] < FP32_BACKWARD_BELOW
            and not dropout and torch.is_grad_enabled()):
        return CpuFlashAttention.apply(q, k, v, scaling)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    bounds = _packed(kwargs, query, key, attention_mask)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    dropout = dropout if module.training else 0.0
    # split, not sliced: the backward pass of a split is one cat of the parts' gradients, where each slice's would
    # be a zero-filled tensor of the whole row and a sum
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    parts = [_attend(q, k, v, dropout, scaling, gqa)
             for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))]
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def document_mask(bounds: list[int], device):
    """FlexAttention's BlockMask for a packed row: causal within each example, nothing across examples."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = bounds[-1]
    lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:])], device=device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)

    def mask_mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    return create_block_mask(mask_mod, None, None, length, length, device=device)


_cache: dict = {}


def _flex(device_type: str):
    """flex_attention, compiled once (dynamic shapes: every packed row has its own length) on GPUs, eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    if "compiled" not in _cache:
        _cache["compiled"] = torch.compile(flex_attention, dynamic=True)
    return _cache["compiled"]


def packed_flex_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    bounds = _packed(kwargs, query, key, attention_mask)
    if bounds is None or (dropout and module.training):  # flex has no dropout
        return packed_sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   is_causal=is_causal, **kwargs)
    # Every layer of one forward sees the same boundaries: build their mask once.
    sig = (tuple(bounds), str(query.device))
    if _cache.get("mask_sig") != sig:
        _cache["mask_sig"], _cache["mask"] = sig, document_mask(bounds, query.device)
    out = _flex(query.device.type)(query, key, value, block_mask=_cache["mask"], scale=scaling,
                                   enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def packed_sdpa_mask(*args, **kwargs):
    # No padding mask means a packed or single causal row: the attentions above need no mask.
    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register(device: str | None = None) -> str:
    """Register the packed attentions; returns the one to use on ``device`` (default: cuda when available, else cpu)."""
    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)
    AttentionInterface.register(FLEX, packed_flex_forward)
    AttentionMaskInterface.register(FLEX, packed_sdpa_mask)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return choose(device, installed_kernels())
