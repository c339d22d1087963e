"""Load a model and tokenizer for a run, with quantization and the chosen finetuning method."""

from __future__ import annotations

import functools
import logging

import torch

from engine.data.encode import load_tokenizer  # noqa: F401 - the one tokenizer loader, torch-free for the web UI
from engine.run import hardware
from engine.run.config import MethodConfig, ModelConfig, TrainingConfig

log = logging.getLogger("engine.train.model_setup")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_precision(training: TrainingConfig) -> str:
    """'bf16', 'fp16' or 'fp32' for this machine."""
    if training.precision != "auto":
        return training.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if hardware.cpu_has_bf16(hardware.cpu_flags()) else "fp32"  # the web UI's rule too


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a run computes in for its resolved precision (QLoRA's bnb_4bit_compute_dtype is this)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def resolve_dtype(model_cfg: ModelConfig, frozen_compute: torch.dtype | None = None) -> torch.dtype:
    """The dtype the weights load in. ``auto``: bf16 (fp16 where bf16 is missing) on a GPU; fp32 on a CPU, except
    for a frozen base (``frozen_compute``: the compute dtype of a LoRA or QLoRA run) that computes in bf16: its
    products round the weights to bf16 anyway, so they load as bf16 (half the memory, no cast per step, and
    activations in bf16), while PEFT keeps the adapters in fp32 (see :func:`frozen_base`)."""
    if model_cfg.dtype != "auto":
        return _DTYPES[model_cfg.dtype]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if frozen_compute == torch.bfloat16 else torch.float32


def frozen_base(cfg, head: str = "lm") -> bool:
    """Whether a run (a RunConfig) trains only adapters (LoRA, QLoRA) over base weights that stay as loaded: no
    modules_to_save, no extended vocabulary, no new score head, which would train 16-bit weights."""
    return (cfg.method.finetuning_type in ("lora", "qlora") and not cfg.method.modules_to_save.strip()
            and not cfg.model.extend_vocab and head == "lm")


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


def rope_scaled_config(model_cfg: ModelConfig):
    """The model's config with its rotary embedding stretched by ``rope_factor`` (None when rope_scaling is none).

    Dynamic and YaRN scale from the trained length (original_max_position_embeddings), so the context grows to
    factor × that length; linear divides every position by the factor."""
    if model_cfg.rope_scaling == "none":
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    text = config.get_text_config()
    trained = text.max_position_embeddings
    params = dict(getattr(text, "rope_parameters", None) or {})
    params.update(rope_type=model_cfg.rope_scaling, factor=float(model_cfg.rope_factor))
    if model_cfg.rope_scaling in ("dynamic", "yarn"):
        params["original_max_position_embeddings"] = trained
    text.rope_parameters = params
    text.max_position_embeddings = int(trained * model_cfg.rope_factor)
    log.info("rope scaling %s x%g: context %d -> %d tokens", model_cfg.rope_scaling, model_cfg.rope_factor, trained,
             text.max_position_embeddings)
    return config


def load_base_model(model_cfg: ModelConfig, compute_dtype: torch.dtype | None = None, device_map=None, attn: str | None = None,
                    head: str = "lm", frozen: bool = False):
    """The base model with its language-model head, or with ``head="score"`` a scalar score head (a reward model:
    sequence classification with one label, its new linear layer named ``score``). ``frozen``: a training run that
    keeps these weights frozen (see :func:`resolve_dtype`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        # ZeRO-3 partitions the weights while they load (zero.Init), and sizes its batch from deepspeed.comm's
        # world size: on CPU ranks nothing has set deepspeed.comm up yet, so it would count one rank of several.
        deepspeed.init_distributed()
    dtype = resolve_dtype(model_cfg, compute_dtype if frozen else None)
    kwargs = dict(dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    if attn:
        kwargs["attn_implementation"] = attn
    config = rope_scaled_config(model_cfg)
    if config is not None:
        kwargs["config"] = config
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
            use_dora=method.use_dora,
            use_rslora=method.use_rslora,
            **({} if method.init_lora_weights == "default" else {"init_lora_weights": method.init_lora_weights}),
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
    def count(p) -> int:  # a ZeRO-3 parameter is partitioned while it loads: ds_numel is its whole size
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


def keep_initial_adapter(model, method: MethodConfig, run_dir) -> None:
    """PiSSA and OLoRA move part of each base weight into the adapter, so their adapter only fits that changed base.
    The starting adapter is kept in ``run_dir/lora_init`` and the final save converts the trained one (PEFT's
    path_initial_model_for_weight_conversion) into a plain LoRA of rank 2r on the original base, which chat and
    export load as any adapter. Checkpoints stay unconverted, so a run resumes from them."""
    if method.init_lora_weights not in ("pissa", "olora") or not hasattr(model, "peft_config"):
        return None
    from pathlib import Path

    init_dir = Path(run_dir) / "lora_init"
    config = model.peft_config["default"]
    config.init_lora_weights = True  # loading the saved start must not decompose the weights again
    model.save_pretrained(str(init_dir))
    config.init_lora_weights = method.init_lora_weights
    return init_dir


def loraplus_optimizer(trainer, ratio: float):
    """LoRA+ (PEFT's create_loraplus_optimizer): the run's optimizer with the B matrices at ``ratio`` × the learning
    rate, handed to the trainer before it would make its own."""
    from peft.optimizers import create_loraplus_optimizer

    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    trainer.optimizer = create_loraplus_optimizer(trainer.model, cls, lr=trainer.args.learning_rate,
                                                  loraplus_lr_ratio=ratio,
                                                  loraplus_weight_decay=trainer.args.weight_decay,
                                                  **kwargs)
    log.info("LoRA+: B matrices at %g x the learning rate", ratio)
    return trainer.optimizer


def _embedding_names(model) -> list[str]:
    """Short names of the input and output embedding modules (embed_tokens, lm_head for Llama-style models)."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if any(m is w for w in wanted)))


def _find_module(model, short: str) -> str:
    for name, _ in model.named_modules():
        if name == short or name.endswith("." + short):
            return name
    raise ValueError(f"method.modules_to_save: the model has no module named '{short}'")
