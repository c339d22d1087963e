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

The budget is the whole training process's (``training.memory_gb``: RSS on a CPU, allocated memory on a GPU): what
the process holds when the plan is made (libraries, weights, adapters) and what the first step adds besides the
activations (gradients and optimizer state of the trained parameters, one chunk of the loss's logits) are taken
off it first, and on a CPU a share is kept for the allocator's slack.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import types
import weakref
from dataclasses import dataclass, replace

import psutil
import torch

from engine.run.hardware import CPU_FIXED, CPU_SLACK
from engine.run.stages import ROWS

log = logging.getLogger("engine.train.activations")
PROBE_TOKENS = 64
PLANNED_STAGES = tuple(row.name for row in ROWS if row.packed)  # trained by engine.train.loss.PackedTrainer
BUDGET_SHARE = 0.5  # of the memory free at start, when no budget is given: the rest is left for allocator slack
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2,
                         "adafactor": 4, "sgd": 0}  # per trained parameter, besides its gradient


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
        if counting[0] and ptr not in skip and storage.device.type != "meta" and recipe_for(t) is None:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    def start(*args):
        counting[0] = True

    def stop(*args):
        raise _Probed

    hooks = [within.register_forward_pre_hook(start), within.register_forward_hook(stop)] if within is not None else []
    try:
        with registering(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    except _Probed:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return sum(seen.values())


def probe(model, tokens: int = PROBE_TOKENS, autocast: torch.dtype | None = None) -> float:
    """Activation bytes per token of one decoder layer of ``model`` in training mode, measured on its first layer
    (the forward pass stops there) with the recomputation of :func:`recompute_cheap_parts` where it is applied, under
    the autocast the run trains with (``autocast``: its dtype, None for none). Measured at ``tokens`` and twice as
    many: the difference is what grows with the batch (autocast's 16-bit copies of fp32 weights do not)."""
    from engine.train.loss import unwrap_causal_lm
    from engine.train.model_setup import decoder_layers

    lm = unwrap_causal_lm(model)
    device = next(p for p in lm.parameters()).device
    embed = lm.get_input_embeddings()
    decoder, first = lm.get_decoder(), decoder_layers(lm)[0]

    def measure(n: int) -> int:
        ids = torch.randint(0, embed.weight.shape[0], (1, n), generator=torch.Generator().manual_seed(0)).to(device)
        # the first layer as every later one sees its input: one that needs a gradient (a frozen embedding's does
        # not, and the first norm would keep nothing)
        with torch.no_grad():
            embeds = embed(ids)
        embeds.requires_grad_(True)
        positions = torch.arange(n, device=device)[None]
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return saved_bytes(model, lambda: decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False),
                               within=first)

    was_training = model.training
    model.train()
    try:
        return (measure(2 * tokens) - measure(tokens)) / tokens
    finally:
        model.train(was_training)


GATED_MLP_NAMES = ("down_proj", "act_fn", "gate_proj", "up_proj")


class _Recipe:
    """How to recompute one cheap tensor (a norm's output, an MLP's act(gate) * up) from tensors the backward pass
    keeps anyway; the recomputed value is shared by every node that saved the tensor, while any of them still
    holds it."""

    __slots__ = ("fn", "args", "nbytes", "value")

    def __init__(self, fn, args, nbytes):
        self.fn, self.args, self.nbytes, self.value = fn, args, nbytes, None

    def __call__(self):
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn(*self.args)
        return self.value


_recipes: dict[int, tuple[weakref.ref, _Recipe]] = {}  # storage address -> (the tensor, its recipe)
_registering = [False]


def _cheap(out, fn, *args):
    """Note that ``out`` (just computed as ``fn(*args)``) can be recomputed from ``args`` in the backward pass."""
    if not (_registering[0] and isinstance(out, torch.Tensor) and out.is_contiguous()):
        return out
    storage = out.untyped_storage()
    ptr, recipe = storage.data_ptr(), _Recipe(fn, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                               storage.nbytes())
    _recipes[ptr] = entry = (weakref.ref(out), recipe)
    weakref.finalize(out, lambda: _recipes.get(ptr) is entry and _recipes.pop(ptr))
    return out


def recipe_for(t: torch.Tensor):
    """The recipe of the tensor whose storage ``t`` views (``t`` itself or a reshape of it), if it has one."""
    storage = t.untyped_storage()
    entry = _recipes.get(storage.data_ptr())
    if entry is None or entry[0]() is None or entry[1].nbytes != storage.nbytes():
        return None
    return entry[1]


def _pack(t):
    recipe = recipe_for(t)
    return t if recipe is None else (recipe, t.shape, t.stride(), t.storage_offset())


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    recipe, shape, stride, offset = packed
    return recipe().as_strided(shape, stride, offset)


@contextlib.contextmanager
def registering():
    """Note the cheap tensors computed within (without saving them differently)."""
    before, _registering[0] = _registering[0], True
    try:
        yield
    finally:
        _registering[0] = before


@contextlib.contextmanager
def cheap_recompute():
    """A training forward pass within keeps, instead of the cheap tensors of the layers
    :func:`recompute_cheap_parts` patched, their recipes; the backward pass recomputes them."""
    with registering(), torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


class _RecomputingLoss:
    def compute_loss(self, *args, **kwargs):
        with cheap_recompute():
            return super().compute_loss(*args, **kwargs)


def recompute_within(trainer):
    """Run the loss's forward passes of ``trainer`` (any stage's Trainer class) within :func:`cheap_recompute`;
    returns it."""
    from engine.train.stages import mix_in

    return mix_in(trainer, _RecomputingLoss, "Recomputing")


def _times(recipe, up):
    return recipe() * up


def _gated_mlp_forward(self, x):
    # as the model's own MLP (down(act(gate(x)) * up(x))), with act(gate) and the product recomputed in the
    # backward pass from gate(x) and up(x), which are kept anyway (by the activation's and the product's backward):
    # act(gate) once, shared by the product's recomputation and the product's own backward. Both paths run the same
    # operations in the same order: a checkpointed layer's replay (outside cheap_recompute) must save what its
    # forward pass saved.
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not (_registering[0] and torch.is_grad_enabled()):
        return self.down_proj(self.act_fn(gate) * up)
    act = _cheap(self.act_fn(gate), self.act_fn, gate)
    recipe = recipe_for(act)
    return self.down_proj(act * up if recipe is None else _cheap(act * up, _times, recipe, up))


def _norm_forward(forward):
    def norm(hidden_states, *args, **kwargs):
        out = forward(hidden_states, *args, **kwargs)
        if args or kwargs or not torch.is_grad_enabled():
            return out
        return _cheap(out, forward, hidden_states)  # the norm keeps its input for its own backward pass anyway
    norm.__wrapped__ = forward
    return norm


class _RMSNorm(torch.autograd.Function):
    """transformers' Llama-form RMSNorm, ``weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)`` computed in fp32, with
    its own backward pass: the same values, in about half the operations of autograd's (which also keeps x in fp32
    where this keeps x as it came and one fp32 scale per row). With xh = x * r and g' = g * weight in fp32:
    dx = r * (g' - xh * mean(g' * xh)), dweight = sum(g * xh.to(x.dtype))."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()  # x itself when x is fp32: nothing below writes into it
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        xh = x.float() * r
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * xh.to(x.dtype)).reshape(-1, x.shape[-1]).float().sum(0).to(weight.dtype)
        g = (grad * weight).float()
        dot = (g * xh).mean(-1, keepdim=True)
        return g.sub_(xh.mul_(dot)).mul_(r).to(x.dtype), grad_w, None


def _rms_norm_forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _llama_rms_norm(module) -> bool:
    """Whether ``module`` computes exactly transformers' LlamaRMSNorm (same bytecode: Qwen2, Mistral, SmolLM, ...)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    code, llama = getattr(type(module).forward, "__code__", None), LlamaRMSNorm.forward.__code__
    return (code is not None and code.co_code == llama.co_code and code.co_names == llama.co_names
            and torch.is_tensor(getattr(module, "weight", None)) and hasattr(module, "variance_epsilon"))


def _is_norm(module) -> bool:
    name = type(module).__name__
    return name.endswith(("RMSNorm", "LayerNorm")) and not list(module.children())


def recompute_cheap_parts(model, norms: bool = True) -> tuple[int, int]:
    """Keep less for the backward pass in each decoder layer, at next to no cost against its matmuls (elementwise
    work recomputed), and change no value: a norm's output (kept by the projections that read it) is recomputed from
    its input, which the norm keeps anyway; in a gated MLP (Llama, Qwen2, Mistral, Gemma:
    ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``) only gate_proj's and up_proj's outputs are kept and
    act(gate) * up is recomputed from them. The saving applies to forward passes within :func:`cheap_recompute`.
    Returns how many norms and MLPs now do so; modules built otherwise are left as they are. ``norms=False`` leaves
    the norms (ZeRO-3: a norm's weight is gathered for its own backward pass, after the projections' that recompute
    its output)."""
    from engine.train.loss import unwrap_causal_lm
    from engine.train.model_setup import decoder_layers

    patched_norms = patched_mlps = 0
    for layer in decoder_layers(unwrap_causal_lm(model)):
        for module in layer.modules() if norms else ():
            if _is_norm(module) and module is not layer:
                if not hasattr(module.forward, "__wrapped__"):
                    own = types.MethodType(_rms_norm_forward, module) if _llama_rms_norm(module) else module.forward
                    module.forward = _norm_forward(own)
                patched_norms += 1
        mlp = getattr(layer, "mlp", None)
        forward = getattr(type(mlp), "forward", None)
        # the transformers MLP classes of that form name exactly these four (LlamaMLP, Qwen2MLP, GemmaMLP, ...)
        if getattr(getattr(forward, "__code__", None), "co_names", ()) != GATED_MLP_NAMES:
            continue
        mlp.forward = types.MethodType(_gated_mlp_forward, mlp)
        patched_mlps += 1
    return patched_norms, patched_mlps


def _fused_lora_forward(self, x, *args, **kwargs):
    # PEFT's vanilla LoRA (base(x) + lora_B(lora_A(dropout(x))) * scaling): over a frozen nn.Linear without dropout
    # one _LoraLinear node; otherwise (quantized bases, dropout) the last product, its scaling and the sum in one
    # addmm; anything else (merged, disabled, several or mixed adapters, DoRA and other variants, a lora_B
    # with a bias or not linear (embeddings, convolutions), ZeRO-3's partitioned weights) goes through PEFT's own
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    lora_B = self.lora_B[name] if name in self.lora_B else None
    autocast = torch.is_tensor(x) and torch.is_autocast_enabled(x.device.type)
    if (args or kwargs or type(lora_B) is not torch.nn.Linear or self.disable_adapters or self.merged
            or name in self.lora_variant or lora_B.bias is not None or hasattr(lora_B.weight, "ds_id")
            or name not in self.lora_A or not (autocast or x.dtype == lora_B.weight.dtype)):
        return self._peft_forward(x, *args, **kwargs)
    base, lora_A = self.base_layer, self.lora_A[name]
    compute = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    if (type(base) is torch.nn.Linear and type(lora_A) is torch.nn.Linear and lora_A.bias is None
            and type(self.lora_dropout[name]) is torch.nn.Identity and not base.weight.requires_grad
            and base.weight.dtype == compute and (base.bias is None or not base.bias.requires_grad)):
        return _LoraLinear.apply(x, base.weight, base.bias, lora_A.weight, lora_B.weight, self.scaling[name])
    result = self.base_layer(x)
    if not (autocast or result.dtype == x.dtype):  # a base computing in another dtype: PEFT casts back (rare)
        return self._peft_forward(x, *args, **kwargs)
    h = self.lora_A[name](self.lora_dropout[name](x))
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B.weight.t(),
                      alpha=self.scaling[name])
    return out.view(result.shape)


ROW_BLOCK = 512


def _frozen_product(a, b, bias=None):
    """``a @ b (+ bias)`` for a frozen weight ``b``, in blocks of ROW_BLOCK rows where oneDNN would run it on one
    thread of two. On a CPU with AMX, oneDNN's bf16 matmul (v3.12, ``amx_blocking_heuristics.cpp``,
    ``find_best_blocking``) scores every split of the work, one thread included, against a bandwidth table in which
    two cores sharing a matrix get less than one core alone; for [M, K] x [K, N] with K >= N and M >= N on two
    threads it often picks one (the default model's [T, 1536] x [1536, 576] and [T, 576] x [576, 576] from about
    T = 576 on: 1.3-1.7 TFLOP/s, against 2.3-2.9 in blocks of 512 rows, which run on both)."""
    product = torch.mm if bias is None else functools.partial(torch.addmm, bias)
    m, (k, n) = a.shape[0], b.shape
    if not (m > ROW_BLOCK and k >= n >= ROW_BLOCK and a.dtype == torch.bfloat16 and a.device.type == "cpu"
            and torch.get_num_threads() == 2):
        return product(a, b)
    out = a.new_empty(m, n)
    for i in range(0, m, ROW_BLOCK):
        product(a[i:i + ROW_BLOCK], b, out=out[i:i + ROW_BLOCK])
    return out


class _LoraLinear(torch.autograd.Function):
    """``base(x) + scaling * (x Aᵀ) Bᵀ`` with a frozen ``nn.Linear`` base and PEFT's vanilla LoRA as one autograd
    node, in the base weight's dtype: the adapter's product is added into the base's output in place in the forward
    pass, and in the backward pass the adapter's share of the input's gradient is added into the base's (autograd
    would compute both and then sum them: one more pass over the input's gradient, besides a node per cast, view,
    product and sum).
    The values are PEFT's under autocast (the same products in the same dtypes), to one rounding of the sums. Keeps
    what PEFT keeps: the input, ``x Aᵀ`` and the adapter's 16-bit copies."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        dtype = weight.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        h = x2 @ a.t()
        out = _frozen_product(x2, weight.t(), bias).addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, a, b, h)
        ctx.scaling, ctx.dtypes = scaling, (x.dtype, lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        gh = (g @ b).mul_(ctx.scaling)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _frozen_product(g, weight).addmm_(gh, a).view(*grad.shape[:-1], -1).to(ctx.dtypes[0])
        if ctx.needs_input_grad[3]:
            grad_a = (gh.t() @ x2).to(ctx.dtypes[1])
        if ctx.needs_input_grad[4]:
            grad_b = (h.t() @ g).t().mul_(ctx.scaling).to(ctx.dtypes[2])
        return grad_x, None, None, grad_a, grad_b, None


def fused_lora(model) -> int:
    """Each LoRA layer's adapter product added by one ``addmm``: ``base(x) + (A x)ᵀ Bᵀ · scaling`` without a separate
    scaling and sum over the whole output (two full passes over each projection's output in the forward pass, and
    the scaling's again in the backward pass). Under autocast the layer's input also meets ``lora_A`` as it is:
    PEFT would cast it to the adapter's fp32 and autocast back to 16 bits, a second copy kept for the backward pass
    (the default model in bf16, per token and layer: 23.7 KiB kept, 13.9 KiB without it); the product runs in
    autocast's dtype either way. Over a frozen ``nn.Linear`` base without dropout (LoRA's usual case) the whole layer
    is one autograd node, :class:`_LoraLinear`. Returns how many layers do so; cases PEFT handles otherwise go
    through its own forward."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")
              and not hasattr(m, "_peft_forward")]
    for layer in layers:
        layer._peft_forward = layer.forward
        layer.forward = types.MethodType(_fused_lora_forward, layer)
    return len(layers)


@dataclass(frozen=True)
class Plan:
    every_n_layers: int  # 0: no checkpointing
    estimate: int  # bytes of activations of the largest batch under this plan
    budget: int  # bytes the activations may take
    whole: str = ""  # how the budget was made, in words

    def describe(self) -> str:
        gb = f"{self.estimate / 1e9:.2f} GB of activations, {self.budget / 1e9:.2f} GB left for them{self.whole}"
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


def held_now(device: torch.device, model=None) -> int:
    """What this process holds now: its RSS on a CPU, the memory allocated on a GPU. Weights loaded from
    safetensors on a CPU are mapped from the file and count in the RSS only once read: one value per page of
    each CPU parameter is read first, as the first step will."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    if model is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.device.type == "cpu" and p.numel():
                    p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].sum()
    return psutil.Process().memory_info().rss


def step_extras(model, optim: str) -> int:
    """Bytes the first step adds besides the activations: gradients and optimizer state of the trained
    parameters, and one chunk of the loss's logits (with its softmax and gradient)."""
    from engine.train.loss import CHUNK_BYTES

    trained = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trained)
    state = sum(p.numel() for p in trained) * OPTIMIZER_STATE_BYTES.get(optim, 8)
    return grads + state + 3 * CHUNK_BYTES


def activation_budget(model, memory_gb: float, optim: str, device: torch.device) -> tuple[int, str]:
    """Bytes the activations of one batch may take within ``memory_gb`` for the whole process (0: half the memory
    free now), and how that was made, in words."""
    ranks_here = 1 if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if memory_gb <= 0:
        free = free_memory(device)
        return int(BUDGET_SHARE * free / ranks_here), f" (half the {free / 1e9:.1f} GB free at start)"
    held = held_now(device, model)
    extras = step_extras(model, optim)
    fixed, slack = (0.0, 1.0) if device.type == "cuda" else (CPU_FIXED, CPU_SLACK)
    left = max(0, int((memory_gb * 1e9 - held - extras - fixed) / slack))
    words = (f" of memory_gb {memory_gb:g}: {held / 1e9:.2f} GB held at start, {extras / 1e9:.2f} GB for gradients,"
             f" optimizer state and the loss" + (f", {fixed / 1e9:.1f} GB for the libraries' working memory and"
                                                 f" allocator slack x{slack:g}" if device.type != "cuda" else ""))
    return left, words


def auto_plan(model, tokens: int, memory_gb: float = 0.0, optim: str = "adamw_torch",
              autocast: torch.dtype | None = None) -> Plan:
    """The checkpointing plan for batches of at most ``tokens`` tokens within ``memory_gb`` for the whole process
    (0: the activations may take half the free memory), trained under ``autocast`` (its dtype, or None)."""
    from engine.train.loss import unwrap_causal_lm

    lm = unwrap_causal_lm(model)
    text = lm.config.get_text_config()
    device = next(p for p in lm.parameters()).device
    budget, words = activation_budget(model, memory_gb, optim, device)
    dtype_bytes = torch.finfo(lm.get_input_embeddings().weight.dtype).bits // 8
    per_layer = probe(model, autocast=autocast)
    chosen = replace(plan(per_layer, text.hidden_size * dtype_bytes, text.num_hidden_layers, tokens, budget), whole=words)
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
            autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
            chosen = auto_plan(model, tokens, cfg.training.memory_gb, cfg.training.optim, autocast)
        except (AttributeError, TypeError, ValueError, NotImplementedError, RuntimeError) as err:
            return f"off (this model's activations could not be measured: {err})"
        every, said = chosen.every_n_layers, chosen.describe()
    if every:
        kwargs = {"use_reentrant": False, "every_n_layers": every}
        args.activation_checkpointing = args.gradient_checkpointing = True
        args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = kwargs
    return said
