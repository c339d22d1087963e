"""The token cross-entropy over the language-model head, computed in chunks of trained positions.

The plain path projects every trained position onto the vocabulary at once: a [tokens x vocab] fp32 logits
tensor (49,152 wide for the default model), its log-softmax kept for the backward pass and its gradient, about
three times 200 MB for 1,000 trained tokens. Here the loss is computed over chunks of positions, so at most one
chunk's logits live at a time (the fused-linear-cross-entropy idea of Liger-Kernel):

- a plain ``nn.Linear`` head: :class:`FusedLinearCrossEntropy` computes each chunk's logits, its loss and, when
  gradients are needed, its gradients for the hidden states and the head right away; the backward pass only
  scales them. No matmul is repeated, so it costs what the plain path costs.
- a frozen ZeRO-3 partitioned linear head (LoRA under ZeRO-3): its weight is gathered once for the whole loss,
  then as a plain head.
- any other head (a LoRA- or modules_to_save-wrapped head, a quantized one, a trained ZeRO-3 partitioned one): each
  chunk runs under ``torch.utils.checkpoint``, which keeps only the chunk's hidden states and recomputes its
  logits in the backward pass (one more head projection).
- on CUDA with ``liger-kernel`` installed, a plain head uses Liger's own Triton kernel instead.

The loss is the sum over trained tokens divided by ``num_items_in_batch`` (the trained tokens of the whole
accumulated batch), exactly what transformers' ``ForCausalLMLoss`` returns from the full logits.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

IGNORE = -100
CHUNK_BYTES = 32 * 2**20  # one chunk's fp32 logits: 170 rows of a 49k vocabulary
TINY = 1e-30  # a target's probability below this is taken from the log-sum-exp instead (fp32 underflow)


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk's fp32 logits take about ``budget`` bytes."""
    return max(16, budget // (4 * vocab))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T + bias, target), ignoring IGNORE targets, chunk by chunk.

    The gradients are computed in the forward pass (softmax minus one-hot, per chunk) and only scaled by the
    incoming gradient in the backward pass, so no logits outlive their chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, rows, grads):
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        need_b = grads and bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        # the logits in the dtype F.linear would give them (autocast's, if on), in one buffer reused by every chunk,
        # and their softmax in one fp32 buffer, filled and normalised in place: fresh buffers per chunk cost page
        # faults on a CPU, and a log-sum-exp's separate max, subtraction, exp and sum each pass over the chunk
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.result_type(hidden, weight)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        shape = (min(rows, hidden.shape[0]), weight.shape[0])
        probs = torch.empty(shape, dtype=torch.float32, device=hidden.device)
        out = probs if dtype == torch.float32 else torch.empty(shape, dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], target[start:start + rows]
            p, logits = probs[:len(t)], out[:len(t)]
            if b is None:
                torch.mm(h.to(dtype), w.t(), out=logits)
            else:
                torch.addmm(b, h.to(dtype), w.t(), out=logits)
            if out is not probs:
                p.copy_(logits)
            torch.ops.aten._softmax.out(p, -1, False, out=p)
            valid = t != IGNORE
            safe = t.clamp(min=0)
            rows_ = torch.arange(len(t), device=t.device)
            picked = p[rows_, safe]
            # CE = -log softmax[target]; where that probability underflows, logsumexp(logits) - logits[target]
            ce = -torch.log(picked)
            low = (picked < TINY) & valid
            if bool(low.any()):
                exact = F.linear(h[low].to(dtype), w, b).float()
                ce[low] = torch.logsumexp(exact, dim=-1) - exact.gather(1, safe[low][:, None]).squeeze(1)
            total += torch.where(valid, ce, 0.0).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum CE)/d logits = softmax - one_hot, zero on ignored rows; computed in place over the softmax
            p[rows_, safe] -= 1.0
            if not bool(valid.all()):
                p[~valid] = 0.0
            if need_h:
                grad = p if out is probs else logits.copy_(p)  # the logits' buffer, done with
                if grad.dtype == grad_h.dtype:
                    torch.mm(grad, w, out=grad_h[start:start + rows])
                else:
                    grad_h[start:start + rows] = grad @ w
            if need_w:
                grad_w.addmm_(p.t(), h.float())
            if need_b:
                grad_b += p.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.float()
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else (grad_w * scale).to(ctx.dtypes[0]),
                None if grad_b is None else (grad_b * scale).to(ctx.dtypes[1]),
                None, None, None)


def _chunk_sum(head, h, t):
    logits = head(h).float()
    return F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="sum")


def checkpointed_sum(head, hidden, target, rows):
    """The summed CE over any head module, each chunk under activation checkpointing."""
    total = None
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start:start + rows], target[start:start + rows]
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
            part = checkpoint(_chunk_sum, head, h, t, use_reentrant=False)
        else:
            part = _chunk_sum(head, h, t)
        total = part if total is None else total + part
    return total if total is not None else hidden.sum() * 0.0


def gathered_sum(head, hidden, target, rows):
    """The summed CE over a frozen ZeRO-3 linear head: its weight gathered once for the whole loss, then the fused
    loss of a plain head. Per chunk, each head call would gather the weight again, in the forward pass and in the
    recomputation, and ranks whose batches have different numbers of trained positions would then call DeepSpeed's
    collectives different numbers of times (a mismatch or a hang); here every rank gathers once per batch."""
    import deepspeed

    params = [p for p in (head.weight, head.bias) if p is not None]
    with deepspeed.zero.GatheredParameters(params):
        bias = None if head.bias is None else head.bias.detach()
        return FusedLinearCrossEntropy.apply(hidden, head.weight.detach(), bias, target, rows,
                                             torch.is_grad_enabled() and hidden.requires_grad)


def plain_linear(head) -> bool:
    """Whether ``head`` is an ordinary linear layer whose whole weight is here (not wrapped, quantized or partitioned)."""
    return (type(head) is torch.nn.Linear and type(head.weight) is torch.nn.Parameter
            and head.weight.numel() == head.in_features * head.out_features and not hasattr(head.weight, "ds_id"))


def frozen_partitioned(head) -> bool:
    """Whether ``head`` is a linear layer partitioned by ZeRO-3 that does not train (a LoRA run's head)."""
    return (type(head) is torch.nn.Linear and hasattr(head.weight, "ds_id")
            and not any(p.requires_grad for p in head.parameters()))


def liger_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def token_loss_sum(head, hidden, target, rows: int | None = None):
    """Summed cross-entropy of ``head(hidden)`` against ``target`` ([N, H] and [N]; IGNORE rows count nothing)."""
    rows = rows or chunk_rows(getattr(head, "out_features", None) or head.weight.shape[0])
    if plain_linear(head):
        if liger_available(hidden.device):
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")(head.weight, hidden, target,
                                                                                          head.bias)
            return out[0] if isinstance(out, tuple) else out
        grads = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
        return FusedLinearCrossEntropy.apply(hidden, head.weight, head.bias, target, rows, grads)
    if frozen_partitioned(head):
        return gathered_sum(head, hidden, target, rows)
    return checkpointed_sum(head, hidden, target, rows)


def unwrap_causal_lm(model):
    """The transformers causal LM inside DeepSpeed / DDP and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


_SCALED = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def supports_chunked_loss(model) -> bool:
    """Whether the causal LM's logits are exactly its output embedding applied to its decoder's last hidden state
    (no soft-capping or scaling after the head, which only the model's own forward knows about)."""
    lm = unwrap_causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None or not hasattr(lm, "get_decoder") or lm.get_output_embeddings() is None:
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _SCALED:
        value = getattr(text, name, None)
        if value not in (None, 1, 1.0, False):
            return False
    try:
        return lm.get_decoder() is not None
    except (AttributeError, NotImplementedError, ValueError):
        return False


def hidden_and_run(model, inputs: dict, keep: torch.Tensor):
    """Run ``model`` (any wrapper) on ``inputs`` with no position projected onto the vocabulary; returns (the model's
    outputs, the decoder's last hidden states at the ``keep`` positions, the output embedding module)."""
    lm = unwrap_causal_lm(model)
    seen = {}

    def grab(module, args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = lm.get_decoder().register_forward_hook(grab)
    try:
        outputs = model(**inputs, logits_to_keep=torch.zeros_like(keep))
    finally:
        handle.remove()
    return outputs, seen["h"][keep], lm.get_output_embeddings()


def example_lengths(dataset) -> list[int]:
    """The token count of every example of a tokenized dataset (read from its Arrow column, no rows decoded)."""
    try:
        import pyarrow.compute as pc

        return pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_pylist()
    except (AttributeError, KeyError, TypeError):
        return [len(row["input_ids"]) for row in dataset]


class PackedTrainer(Trainer):
    """The trainer of the packed causal-LM stages (sft, pt): transformers' Trainer whose loss is
    :func:`token_loss_sum` over the trained positions the packed collator marks (``logits_to_keep``,
    ``shift_labels``: engine.train.collate), divided as the model would divide it (batches without those keys, and
    models whose logits are not a plain projection, take the usual path); with ``token_budget`` its training batches
    are :class:`engine.train.collate.TokenBudgetBatches` of that many tokens."""

    def __init__(self, *args, token_budget: int | None = None, **kwargs):
        self.token_budget = token_budget
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        if not self.token_budget:
            return super()._get_train_sampler(train_dataset)
        from engine.train.collate import TokenBudgetBatches

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = example_lengths(dataset)
        return TokenBudgetBatches(lengths, self.token_budget, seed=self.args.data_seed or self.args.seed,
                                  rank=self.args.process_index, world=max(1, self.args.world_size))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "logits_to_keep" not in inputs or "shift_labels" not in inputs or not supports_chunked_loss(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        keep, target = inputs.pop("logits_to_keep"), inputs.pop("shift_labels")
        inputs.pop("labels", None)
        outputs, hidden, head = hidden_and_run(model, inputs, keep)
        total = token_loss_sum(head, hidden, target.to(hidden.device))
        if num_items_in_batch is None:  # transformers' ForCausalLMLoss: a mean over the trained tokens
            loss = total / (target != IGNORE).sum().clamp(min=1)
        else:
            loss = total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch)
                            else num_items_in_batch)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer.compute_loss does
        if return_outputs:
            outputs["loss"] = loss
            return loss, outputs
        return loss
