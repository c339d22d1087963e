"""``gradient_checkpointing: auto``: checkpoint every k-th decoder layer, the fewest layers that keep the
activations of the largest batch within a memory budget.

The activation memory of one token in one layer is measured on the model as it will train (its method, dtype and
attention): a forward pass of a short dummy row through the first decoder layer, counting the bytes autograd saves
for the backward pass (``torch.autograd.graph.saved_tensors_hooks``; weights and buffers excluded). A checkpointed layer keeps only its
input (hidden_size values per token) and recomputes the rest in the backward pass, one layer at a time, so with
``c`` of ``L`` layers checkpointed the batch keeps about

    tokens x (c x hidden x bytes + (L - c) x per_layer + per_layer)

transformers checkpoints every ``every_n_layers``-th layer (TrainingArguments.gradient_checkpointing_kwargs); the plan
is the largest such step that fits, 0 when nothing needs checkpointing, 1 (every layer) when nothing fits.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import psutil
import torch

log = logging.getLogger("engine.train.activations")
PROBE_TOKENS = 64
PLANNED_STAGES = ("sft", "pt")  # the stages trained by engine.train.loss.PackedTrainer
BUDGET_SHARE = 0.5  # of the memory free at start, when no budget is given: the rest is left for allocator slack


class _Probed(Exception):
    """Raised after the first decoder layer of a probe: the rest of the forward pass is not needed."""


def saved_bytes(model, forward, within=None) -> int:
    """Bytes of the tensors autograd saves while ``forward()`` runs (each storage counted once, parameters and
    buffers excluded); with ``within`` (a module) only those saved during its forward pass, which ends the probe."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}
    counting = [within is None]

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if counting[0] and ptr not in skip and storage.device.type != "meta":
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    def start(*args):
        counting[0] = True

    def stop(*args):
        raise _Probed

    hooks = [within.register_forward_pre_hook(start), within.register_forward_hook(stop)] if within is not None else []
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    except _Probed:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return sum(seen.values())


def probe(model, tokens: int = PROBE_TOKENS) -> float:
    """Activation bytes per token of one decoder layer of ``model`` in training mode, measured on its first layer
    (the forward pass stops there)."""
    from engine.train.loss import unwrap_causal_lm
    from engine.train.model_setup import decoder_layers

    lm = unwrap_causal_lm(model)
    device = next(p for p in lm.parameters()).device
    vocab = lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(tokens, device=device)[None]
    was_training = model.training
    model.train()
    try:
        decoder = lm.get_decoder()
        total = saved_bytes(model, lambda: decoder(input_ids=ids, position_ids=positions, use_cache=False),
                            within=decoder_layers(lm)[0])
    finally:
        model.train(was_training)
    return total / tokens


@dataclass(frozen=True)
class Plan:
    every_n_layers: int  # 0: no checkpointing
    estimate: int  # bytes of activations of the largest batch under this plan
    budget: int

    def describe(self) -> str:
        gb = f"{self.estimate / 2**30:.2f} GiB of activations, budget {self.budget / 2**30:.2f} GiB"
        if self.every_n_layers == 0:
            return f"off ({gb})"
        if self.every_n_layers == 1:
            return f"every layer ({gb})"
        return f"one layer in {self.every_n_layers} ({gb})"


def estimate(per_layer: float, hidden_bytes: int, layers: int, tokens: int, every: int) -> int:
    checkpointed = 0 if every == 0 else math.ceil(layers / every)
    kept = checkpointed * hidden_bytes + (layers - checkpointed) * per_layer + (per_layer if checkpointed else 0)
    return int(tokens * kept)


def plan(per_layer: float, hidden_bytes: int, layers: int, tokens: int, budget: int) -> Plan:
    """The plan with the fewest checkpointed layers whose estimate fits ``budget``; every layer when none fits."""
    for every in [0] + list(range(layers, 0, -1)):
        need = estimate(per_layer, hidden_bytes, layers, tokens, every)
        if need <= budget:
            return Plan(every, need, budget)
    return Plan(1, estimate(per_layer, hidden_bytes, layers, tokens, 1), budget)


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def auto_plan(model, tokens: int, budget_gb: float = 0.0) -> Plan:
    """The checkpointing plan for batches of at most ``tokens`` tokens within ``budget_gb`` (0: half the free memory)."""
    from engine.train.loss import unwrap_causal_lm

    lm = unwrap_causal_lm(model)
    text = lm.config.get_text_config()
    device = next(p for p in lm.parameters()).device
    ranks_here = 1 if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    budget = int(budget_gb * 2**30) if budget_gb > 0 else int(BUDGET_SHARE * free_memory(device) / ranks_here)
    dtype_bytes = torch.finfo(lm.get_input_embeddings().weight.dtype).bits // 8
    per_layer = probe(model)
    chosen = plan(per_layer, text.hidden_size * dtype_bytes, text.num_hidden_layers, tokens, budget)
    log.info("activation checkpointing: %s; %.0f KiB per token per layer measured, %d tokens per batch at most",
             chosen.describe(), per_layer / 1024, tokens)
    return chosen


def apply_auto(args, model, cfg) -> str:
    """Resolve ``gradient_checkpointing: auto`` for this run: set the TrainingArguments fields transformers reads
    (every_n_layers of a non-reentrant checkpoint) and return the choice in words for train.log."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if cfg.method.stage not in PLANNED_STAGES:  # TRL's trainers enable checkpointing their own way
        return f"off (planned for {', '.join(PLANNED_STAGES)} only; set on to checkpoint every layer)"
    if is_deepspeed_zero3_enabled():  # the weights are partitioned until training starts: no probe, every layer
        every, said = 1, "every layer (ZeRO-3: not measured)"
    else:
        tokens = cfg.data.cutoff_len * cfg.training.per_device_train_batch_size  # the largest batch either way
        try:
            chosen = auto_plan(model, tokens, cfg.training.activation_memory_gb)
        except (AttributeError, TypeError, ValueError, NotImplementedError, RuntimeError) as err:
            return f"off (this model's activations could not be measured: {err})"
        every, said = chosen.every_n_layers, chosen.describe()
    if every:
        kwargs = {"use_reentrant": False, "every_n_layers": every}
        args.activation_checkpointing = args.gradient_checkpointing = True
        args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = kwargs
    return said
