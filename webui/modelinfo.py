"""What the Model tab shows about a local model directory, without loading its weights.

The parameter count is read from the safetensors headers (a few KB per shard, exact for any
architecture); a model without safetensors falls back to config.json arithmetic. The memory
estimate is a rough upper bound from the same numbers. Imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.run.checkpoint import safetensors_params
from engine.run.hardware import CPU_FIXED, CPU_LIBRARIES, CPU_SLACK
from engine.run.paths import exists

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ModelInfo:
    path: Path
    architecture: str = "?"
    model_type: str = "?"
    params: int | None = None
    embed_params: int = 0
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    intermediate: int = 0
    vocab: int = 0
    context: int = 0
    chat_template: bool = False


class ModelPathError(ValueError):
    pass


def resolve_model_path(text: str, policy=None) -> Path:
    """A typed model path made absolute (relative paths are taken from the project root when not found here);
    with the page's ``policy`` (engine.run.paths), a path outside its folders is refused before it is looked at."""
    text = (text or "").strip()
    if not text:
        raise ModelPathError("empty")
    path = Path(text).expanduser()
    if not path.is_absolute() and not exists(path) and exists(ROOT / path):
        path = ROOT / path
    if policy is not None and not policy.allows(path.absolute()):
        raise ModelPathError(str(policy.refusal(text)))
    if not exists(path):
        raise ModelPathError(f"not found: {path}")
    if not path.is_dir():
        raise ModelPathError(f"not a directory: {path}")
    if not (path / "config.json").is_file():
        raise ModelPathError(f"no config.json in {path}: not a Hugging Face model directory")
    return path.resolve()


def local_models(roots: list[Path]) -> list[str]:
    """Model directories (with config.json) directly under each root, as paths relative to the project when possible."""
    out = []
    for root in roots:
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if (p / "config.json").is_file():
                try:
                    out.append(str(p.resolve().relative_to(ROOT)))
                except ValueError:
                    out.append(str(p.resolve()))
    return list(dict.fromkeys(out))


def inspect_model(path: Path) -> ModelInfo:
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    text_cfg = cfg.get("text_config", cfg)
    get = lambda *keys: next((text_cfg[k] for k in keys if isinstance(text_cfg.get(k), int)), 0)  # noqa: E731
    info = ModelInfo(path=path, architecture=(cfg.get("architectures") or ["?"])[0], model_type=cfg.get("model_type", "?"))
    info.hidden = get("hidden_size", "n_embd", "d_model")
    info.layers = get("num_hidden_layers", "n_layer", "num_layers")
    info.heads = get("num_attention_heads", "n_head")
    info.kv_heads = get("num_key_value_heads") or info.heads
    info.head_dim = get("head_dim") or (info.hidden // info.heads if info.heads else 0)
    info.intermediate = get("intermediate_size", "n_inner", "ffn_dim") or 4 * info.hidden
    info.vocab = get("vocab_size")
    info.context = get("max_position_embeddings", "n_positions", "seq_length")
    counted = safetensors_params(path)
    if counted:
        info.params, info.embed_params = counted
    elif info.hidden and info.layers:
        info.embed_params = info.vocab * info.hidden * (1 if text_cfg.get("tie_word_embeddings", True) else 2)
        info.params = info.layers * (_attn_params(info) + 3 * info.hidden * info.intermediate) + info.embed_params
    tok_cfg = path / "tokenizer_config.json"
    try:
        has_in_cfg = bool(json.loads(tok_cfg.read_text(encoding="utf-8")).get("chat_template")) if tok_cfg.is_file() else False
    except ValueError:
        has_in_cfg = False
    info.chat_template = has_in_cfg or (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file()
    return info


def _attn_params(i: ModelInfo) -> int:
    return 2 * i.hidden * i.heads * i.head_dim + 2 * i.hidden * i.kv_heads * i.head_dim


def lora_params(i: ModelInfo, rank: int) -> int:
    """Adapter parameters of rank ``rank`` on every linear layer of a llama-like decoder."""
    q, kv = i.heads * i.head_dim, i.kv_heads * i.head_dim
    shapes = [(i.hidden, q), (i.hidden, kv), (i.hidden, kv), (q, i.hidden),
              (i.hidden, i.intermediate), (i.hidden, i.intermediate), (i.intermediate, i.hidden)]
    return i.layers * sum(rank * (a + b) for a, b in shapes)


def kept_per_token_layer(i: ModelInfo) -> int:
    """Values one decoder layer keeps for the backward pass per token, as the engine trains
    (engine.train.activations: norm outputs and the MLP's act(gate) * up are recomputed): the two norms' inputs,
    attention's q, k, v and output, the MLP's gate and up projections."""
    q, kv = i.heads * i.head_dim, i.kv_heads * i.head_dim
    return 2 * i.hidden + 2 * q + 2 * kv + 2 * i.intermediate


def kept_bytes(i: ModelInfo, half: bool) -> int:
    """Bytes one decoder layer keeps per token: 4 per kept value in fp32, 2 in 16 bits (the engine's RMSNorm keeps its
    input as it came, not as fp32: engine.train.activations._RMSNorm). Within 4% of the engine's probe on the
    default model either way (tests/webui/test_pieces.py)."""
    return kept_per_token_layer(i) * (2 if half else 4)


def estimate_memory(i: ModelInfo, method: str, quantization: str, batch: int, cutoff: int, lora_rank: int,
                    freeze_layers: int, gradient_checkpointing: bool | str, gpu: bool,
                    memory_gb: float = 0.0, half: bool | None = None) -> dict[str, float]:
    """Peak memory in GiB (weights, gradients + optimizer, activations of the largest batch, and the total with the
    runtime's own) of one training process. ``gradient_checkpointing`` 'auto' checkpoints as many layers as
    ``memory_gb`` needs (0: none, the most it takes), as the engine plans it. ``half``: the run computes in 16 bits
    (engine.run.hardware.computes_in_16_bits; None: on a GPU only). Weights load in 16 bits on a GPU, and on a CPU for the
    frozen base of a 16-bit LoRA or QLoRA run (engine.train.model_setup.resolve_dtype); else in fp32."""
    params = i.params or 0
    half = gpu if half is None else half
    wbytes = 2 if gpu or (half and method in ("lora", "qlora")) else 4
    body = params - i.embed_params
    qbytes = {"nf4": 0.53, "fp4": 0.53, "int8": 1.0}.get(quantization)
    weights = (body * qbytes + i.embed_params * wbytes) if qbytes else params * wbytes
    if method in ("lora", "qlora"):
        trainable = lora_params(i, lora_rank)
    elif method == "freeze":
        trainable = body * min(freeze_layers, i.layers) / max(i.layers, 1)
    else:
        trainable = params
    # gradients in the training dtype + AdamW's two fp32 moments (+ fp32 master weights with bf16 on GPUs)
    states = trainable * ((2 if gpu else 4) + 8 + (4 if gpu and method in ("full", "freeze") else 0))
    tokens = batch * cutoff
    # + one chunk's fp32 logits, softmax and gradient (the loss is computed a chunk at a time: engine/train/loss.py)
    loss = min(tokens, 256) * i.vocab * 12
    full = tokens * i.layers * kept_bytes(i, half)
    # checkpointed: each layer's input, in the dtype of the residual stream (the weights')
    every = tokens * (i.layers * i.hidden * wbytes + kept_bytes(i, half))
    fixed, slack = (0.4 * 2**30, 1.0) if gpu else (CPU_FIXED + CPU_LIBRARIES, CPU_SLACK)
    if gradient_checkpointing in (True, "on"):
        activations = every
    elif gradient_checkpointing == "auto" and memory_gb > 0:
        activations = min(full, max(every, (memory_gb * 1e9 - weights - states - loss - fixed) / slack))
    else:
        activations = full
    gib = 2 ** 30
    parts = {"weights": weights / gib, "states": states / gib, "activations": (activations + loss) / gib}
    parts["total"] = (weights + states + loss + activations * slack + fixed) / gib
    return parts


def human_count(n: int | None) -> str:
    if not n:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return str(n)
