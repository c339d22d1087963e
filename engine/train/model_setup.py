"""Load a model and tokenizer for a run, with quantization and the chosen finetuning method."""

from __future__ import annotations

import functools
import logging

import torch

from engine.data.encode import load_tokenizer  # noqa: F401 - the one tokenizer loader, torch-free for the web UI
from engine.run.config import MethodConfig, ModelConfig, TrainingConfig

log = logging.getLogger("engine.train.model_setup")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks) or any(
        getattr(torch._C._cpu, name, lambda: False)() for name in checks
    )


def resolve_precision(training: TrainingConfig) -> str:
    """'bf16', 'fp16' or 'fp32' for this machine."""
    if training.precision != "auto":
        return training.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def resolve_dtype(model_cfg: ModelConfig) -> torch.dtype:
    if model_cfg.dtype != "auto":
        return _DTYPES[model_cfg.dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(model_cfg: ModelConfig, compute_dtype: torch.dtype):
    if model_cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.quantization,
        bnb_4bit_use_double_quant=model_cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_base_model(model_cfg: ModelConfig, compute_dtype: torch.dtype | None = None, device_map=None, attn: str | None = None,
                    head: str = "lm"):
    """The base model with its language-model head, or with ``head="score"`` a scalar score head (a reward model:
    sequence classification with one label, its new linear layer named ``score``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        # ZeRO-3 partitions the weights while they load (zero.Init), and sizes its batch from deepspeed.comm's
        # world size: on CPU ranks nothing has set deepspeed.comm up yet, so it would count one rank of several.
        deepspeed.init_distributed()
    dtype = resolve_dtype(model_cfg)
    kwargs = dict(dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    if attn:
        kwargs["attn_implementation"] = attn
    qcfg = quantization_config(model_cfg, compute_dtype or dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = device_map or ({"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"})
    elif device_map is not None:
        kwargs["device_map"] = device_map
    if head == "score":
        return AutoModelForSequenceClassification.from_pretrained(model_cfg.path, num_labels=1, **kwargs)
    return AutoModelForCausalLM.from_pretrained(model_cfg.path, **kwargs)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (layers / h / blocks), found generically."""
    n = getattr(model.config, "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (n is None or len(module) == n):
            if best is None or name.count(".") < best[0].count("."):
                best = (name, module)
    if best is None:
        raise ValueError("cannot find the decoder layers of this model for freeze tuning")
    return best[1]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def setup_finetuning(model, method: MethodConfig, gradient_checkpointing: bool, train_embeddings: bool = False,
                     head: str = "lm"):
    """Apply full / freeze / lora / qlora to a loaded model; returns the model to train.

    freeze trains the last ``freeze_trainable_layers`` decoder layers and ``modules_to_save``; the embeddings,
    the final norm and lm_head stay frozen. ``train_embeddings`` (a vocabulary-extended run) also trains the
    input and output embeddings: LoRA/QLoRA save them whole next to the adapter (modules_to_save; tied weights
    stay tied), freeze makes them trainable, full trains them anyway. A ``score`` head (reward model) is new, so it
    always trains: saved whole next to a LoRA adapter, trainable under freeze.
    """
    heads = ["score"] if head == "score" else []
    extra = _embedding_names(model) if train_embeddings else []
    # Training batches are packed (padding-free): transformers only keeps packed examples apart
    # when no KV cache is built, so the cache must be off or examples attend to each other.
    model.config.use_cache = False
    if method.finetuning_type in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            model.enable_input_require_grads()
        target = method.lora_target.strip()
        to_save = list(dict.fromkeys(_csv(method.modules_to_save) + extra + heads))
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        lcfg = LoraConfig(
            r=method.lora_rank,
            lora_alpha=method.lora_alpha,
            lora_dropout=method.lora_dropout,
            target_modules="all-linear" if target == "all-linear" else _csv(target),
            modules_to_save=to_save or None,
            ensure_weight_tying=tied and bool(set(to_save) & set(_embedding_names(model))),
            task_type="SEQ_CLS" if heads else "CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
        if extra:
            # The trained copies of the embeddings are saved (modules_to_save); PEFT would also save the
            # resized base matrices, twice the size again, which fit_base rebuilds from the base instead.
            model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    elif method.finetuning_type == "freeze":
        model.requires_grad_(False)
        layers = decoder_layers(model)
        for layer in layers[-method.freeze_trainable_layers:]:
            layer.requires_grad_(True)
        for name in _csv(method.modules_to_save) + extra + heads:
            model.get_submodule(_find_module(model, name)).requires_grad_(True)
    else:
        model.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


def _embedding_names(model) -> list[str]:
    """Short names of the input and output embedding modules (embed_tokens, lm_head for Llama-style models)."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if any(m is w for w in wanted)))


def _find_module(model, short: str) -> str:
    for name, _ in model.named_modules():
        if name == short or name.endswith("." + short):
            return name
    raise ValueError(f"method.modules_to_save: the model has no module named '{short}'")
