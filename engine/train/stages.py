"""The trainer builders, one per row of the stage table (engine/run/stages.py, which holds each stage's data
kind, fields, metrics and checks): stage name -> how its data is prepared, its trainer built, and its arguments.
The builders import torch and TRL lazily.

Every stage tokenizes with the run's template through ``engine.data.encode`` (the preference stages with
``encode_answers``, which gives a prompt and an answer exactly the tokens SFT gives them), so a checkpoint of
any stage chats in the format it was trained on. The TRL trainers receive these token ids; where a trainer
would tokenize again, its dataset step is replaced by one that keeps them.

Online RL (``rl``) is GRPO against a reward model trained by the ``rm`` stage: TRL 1.x has no PPOTrainer,
and GRPO with a reward model is its replacement (sampled groups instead of a value model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.run.stages import STAGE_KINDS, batch_fill

REWARD_NAME = "reward_model"  # GRPO logs the reward model's mean as rewards/<REWARD_NAME>/mean


def mix_in(trainer, mixin: type, prefix: str):
    """Put ``mixin`` before the class of ``trainer`` (any stage's Trainer class) in its method order; returns it."""
    cls = type(trainer)
    trainer.__class__ = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
    return trainer


@dataclass
class StageContext:
    cfg: Any  # RunConfig
    run_dir: Path
    tokenizer: Any
    template: Any
    args: Any = None  # transformers.TrainingArguments
    callbacks: list = field(default_factory=list)
    data: Any = None
    stats: dict = field(default_factory=dict)


def sft_data(ctx: StageContext) -> None:
    from engine.data.loader import build_sft_dataset

    train, evaluation, stats = build_sft_dataset(ctx.cfg.data, ctx.tokenizer, ctx.template, seed=ctx.cfg.training.seed)
    ctx.data, ctx.stats = (train, evaluation), stats


def token_budget(cfg) -> int | None:
    """Tokens per training batch with ``training.batch_by: tokens`` on a packed stage, else None."""
    kind, n = batch_fill(cfg)
    return n if kind == "tokens" else None


def describe_batch(cfg) -> str:
    """A training batch per device in words, for train.log (the run card says it in the page's language)."""
    kind, n = batch_fill(cfg)
    return f"≤ {n:,} tokens" if kind == "tokens" else f"{n} example{'s' if n != 1 else ''}"


def sft_trainer(ctx: StageContext, model):
    from engine.train.collate import packed_collator
    from engine.train.loss import PackedTrainer

    train, evaluation = ctx.data
    # Padding-free batches: examples are concatenated into one row with restarting position_ids and
    # their boundaries (cu_seq_lens); engine.train.attention attends within each example, so no compute goes to padding,
    # and only trained positions are projected onto the vocabulary, a chunk at a time (engine.train.loss).
    collator = packed_collator(model)
    return PackedTrainer(
        model=model,
        args=ctx.args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
        token_budget=token_budget(ctx.cfg),
    )


# ---------------------------------------------------------------- data

def pt_data(ctx: StageContext) -> None:
    from engine.data.loader import build_pretrain_dataset

    train, evaluation, ctx.stats = build_pretrain_dataset(ctx.cfg.data, ctx.tokenizer, seed=ctx.cfg.training.seed)
    ctx.data = (train, evaluation)


def _answers(ctx: StageContext):
    from engine.data.loader import build_answer_dataset

    train, evaluation, ctx.stats = build_answer_dataset(ctx.cfg.data, ctx.tokenizer, ctx.template,
                                                        seed=ctx.cfg.training.seed,
                                                        kind=STAGE_KINDS[ctx.cfg.method.stage])
    return train, evaluation


def pair_data(ctx: StageContext) -> None:
    ctx.data = _answers(ctx)


def _whole(row: dict) -> dict:
    return {"chosen_ids": row["prompt_ids"] + row["chosen_ids"], "rejected_ids": row["prompt_ids"] + row["rejected_ids"]}


def rm_data(ctx: StageContext) -> None:
    """The reward model scores whole sequences: prompt + chosen against prompt + rejected."""
    ctx.data = tuple(None if d is None else d.map(_whole, remove_columns=["prompt_ids"], desc="Joining")
                     for d in _answers(ctx))


def kto_data(ctx: StageContext) -> None:
    train, evaluation = _answers(ctx)
    # KTO reads its data in order (each example's KL term uses its batch neighbour's answer), so shuffle once here.
    ctx.data = (train.shuffle(seed=ctx.cfg.training.seed).flatten_indices(), evaluation)


def _orpo_row(row: dict) -> dict:
    prompt, out = row["prompt_ids"], {}
    out["prompt_input_ids"], out["prompt_attention_mask"] = prompt, [1] * len(prompt)
    for key in ("chosen", "rejected"):
        answer = row[f"{key}_ids"]
        out[f"{key}_input_ids"] = prompt + answer
        out[f"{key}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{key}_labels"] = [-100] * len(prompt) + answer
    return out


def orpo_data(ctx: StageContext) -> None:
    """Pairs in the columns ORPOTrainer's collator pads (its own tokenize_row would add a second end-of-turn)."""
    ctx.data = tuple(None if d is None else d.map(_orpo_row, remove_columns=d.column_names, desc="ORPO columns")
                     for d in _answers(ctx))


def rl_data(ctx: StageContext) -> None:
    from engine.data.loader import build_prompt_dataset

    train, evaluation, ctx.stats = build_prompt_dataset(ctx.cfg.data, ctx.tokenizer, ctx.template,
                                                        seed=ctx.cfg.training.seed,
                                                        max_new_tokens=ctx.cfg.method.max_new_tokens)
    ctx.data = (train, evaluation)


# ---------------------------------------------------------------- arguments (TrainingArguments subclass + fields)

def plain_arguments(cfg) -> dict:
    return {}


def rm_arguments(cfg) -> dict:
    from trl import RewardConfig

    return dict(cls=RewardConfig, max_length=cfg.data.cutoff_len, include_num_input_tokens_seen="non_padding")


def dpo_arguments(cfg) -> dict:
    from trl import DPOConfig

    m = cfg.method
    losses, weights = [m.dpo_loss], [1.0]
    if m.sft_weight > 0:
        losses, weights = losses + ["sft"], weights + [m.sft_weight]
    return dict(cls=DPOConfig, beta=m.beta, loss_type=losses, loss_weights=weights, max_length=cfg.data.cutoff_len,
                include_num_input_tokens_seen="non_padding")


def kto_arguments(cfg) -> dict:
    from trl import KTOConfig

    return dict(cls=KTOConfig, beta=cfg.method.beta, max_length=cfg.data.cutoff_len,
                desirable_weight=cfg.method.desirable_weight, undesirable_weight=cfg.method.undesirable_weight,
                include_num_input_tokens_seen="non_padding")


def orpo_arguments(cfg) -> dict:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental in TRL 1.x; we know
    from trl.experimental.orpo import ORPOConfig

    # ORPO's batches have no input_ids column for the Trainer to count; tokens are not reported
    return dict(cls=ORPOConfig, beta=cfg.method.beta, max_length=cfg.data.cutoff_len, include_num_input_tokens_seen="no")


def rl_arguments(cfg) -> dict:
    from trl import GRPOConfig

    m = cfg.method
    # GRPO counts prompt and completion tokens itself
    return dict(cls=GRPOConfig, num_generations=m.num_generations, max_completion_length=m.max_new_tokens,
                beta=m.kl_beta, include_num_input_tokens_seen="no")


# ---------------------------------------------------------------- trainers

class DocumentPieces:
    """Collates packed pretraining blocks: each block is cut where its position ids restart (a document, or the
    remainder of one), and the pieces go padding-free into one row, each attending only to itself."""

    def __init__(self, model):
        from engine.train.collate import packed_collator

        self.flatten = packed_collator(model)

    def __call__(self, blocks):
        pieces = []
        for block in blocks:
            ids, labels, positions = block["input_ids"], block["labels"], block["position_ids"]
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
            pieces += [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip(starts, starts[1:])]
        return self.flatten(pieces)


def pt_trainer(ctx: StageContext, model):
    from engine.train.loss import PackedTrainer

    train, evaluation = ctx.data
    return PackedTrainer(model=model, args=ctx.args, train_dataset=train, eval_dataset=evaluation,
                         data_collator=DocumentPieces(model), processing_class=ctx.tokenizer, callbacks=ctx.callbacks,
                         token_budget=token_budget(ctx.cfg))


def rm_trainer(ctx: StageContext, model):
    from trl import RewardTrainer

    train, evaluation = ctx.data  # chosen_ids / rejected_ids: RewardTrainer takes tokenized pairs as they are
    return RewardTrainer(model=model, args=ctx.args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=ctx.tokenizer, callbacks=ctx.callbacks)


def adapter_for_trainer(model):
    """(base model, LoRA config or None): DPO, KTO and GRPO compute the reference log-probabilities with the
    adapter disabled (the base itself, no second copy) only when they add the adapter themselves; handed a
    PEFT model they would copy its adapter into a second, 'ref' adapter. So the adapter made by
    setup_finetuning is taken off again and its config passed on."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.unload(), model.peft_config["default"]
    return model, None


def _keep_tokens(self, dataset, *args, **kwargs):
    return dataset  # already tokenized with the run's template (engine.data.encode.encode_answers)


def _adapter_reference_trainer(trl_name: str, prepare):
    """A DPO/KTO trainer builder: TRL's trainer with its dataset step replaced by ``prepare`` (our ids are kept),
    the run's adapter handed over as a config so the reference is the base with the adapter disabled."""

    def build(ctx: StageContext, model):
        import trl

        base = getattr(trl, trl_name)
        trainer_cls = type(f"Workbench{trl_name}", (base,), {"_prepare_dataset": prepare})
        model, peft_config = adapter_for_trainer(model)
        train, evaluation = ctx.data
        return trainer_cls(model=model, ref_model=None, args=ctx.args, train_dataset=train, eval_dataset=evaluation,
                           processing_class=ctx.tokenizer, callbacks=ctx.callbacks, peft_config=peft_config)

    return build


dpo_trainer = _adapter_reference_trainer("DPOTrainer", _keep_tokens)


def _kl_completions(batch: dict) -> dict:
    # TRL's KL estimate: each prompt paired with the previous example's completion within a batch
    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
    return batch


def _kto_dataset(self, dataset, processing_class, args, dataset_name):
    if not self.calculate_KL:
        return dataset
    return dataset.map(_kl_completions, batched=True, batch_size=args.per_device_train_batch_size,
                       desc=f"KL completions ({dataset_name})")


kto_trainer = _adapter_reference_trainer("KTOTrainer", _kto_dataset)


def _no_tokenize(self, feature, model=None):
    return {}  # the columns are already there (orpo_data)


def orpo_trainer(ctx: StageContext, model):
    from trl.experimental.orpo import ORPOTrainer

    trainer_cls = type("WorkbenchORPOTrainer", (ORPOTrainer,), {"tokenize_row": _no_tokenize})
    train, evaluation = ctx.data
    return trainer_cls(model=model, args=ctx.args, train_dataset=train, eval_dataset=evaluation,
                       processing_class=ctx.tokenizer, callbacks=ctx.callbacks)


def load_reward_model(path: str | Path, model_cfg):
    """(reward model, its tokenizer) from an rm run's final/ or checkpoint-N: full weights as they are, or a LoRA
    adapter (with its trained score head) merged into its base."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine.run.checkpoint import resolve
    from engine.train.model_setup import resolve_dtype

    ckpt = resolve(path, field="method.reward_model", generative=False)
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path, trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = dict(num_labels=1, dtype=resolve_dtype(model_cfg), trust_remote_code=model_cfg.trust_remote_code)
    if ckpt.kind == "full":
        model = AutoModelForSequenceClassification.from_pretrained(ckpt.path, **kwargs)
    else:
        from peft import PeftModel

        from engine.run.checkpoint import fit_base

        base = fit_base(AutoModelForSequenceClassification.from_pretrained(ckpt.base, **kwargs), tokenizer)
        model = PeftModel.from_pretrained(base, str(ckpt.path)).merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config._name_or_path = REWARD_NAME
    return model.eval().requires_grad_(False), tokenizer


def rl_trainer(ctx: StageContext, model):
    from trl import GRPOTrainer

    reward, reward_tokenizer = load_reward_model(ctx.cfg.method.reward_model, ctx.cfg.model)
    model, peft_config = adapter_for_trainer(model)
    train, evaluation = ctx.data
    return GRPOTrainer(model=model, reward_funcs=reward, args=ctx.args, train_dataset=train, eval_dataset=evaluation,
                       processing_class=ctx.tokenizer, reward_processing_classes=reward_tokenizer,
                       callbacks=ctx.callbacks, peft_config=peft_config)


@dataclass(frozen=True)
class Stage:
    prepare_data: Callable[[StageContext], None]
    build_trainer: Callable[[StageContext, Any], Any]
    arguments: Callable[[Any], dict] = plain_arguments  # {"cls": TrainingArguments subclass, its fields...}
    head: str = "lm"  # "score": a scalar reward head instead of the language-model head (engine.train.model_setup)


STAGES: dict[str, Stage] = {
    "sft": Stage(sft_data, sft_trainer),
    "pt": Stage(pt_data, pt_trainer),
    "rm": Stage(rm_data, rm_trainer, rm_arguments, head="score"),
    "dpo": Stage(pair_data, dpo_trainer, dpo_arguments),
    "kto": Stage(kto_data, kto_trainer, kto_arguments),
    "orpo": Stage(orpo_data, orpo_trainer, orpo_arguments),
    "rl": Stage(rl_data, rl_trainer, rl_arguments),
}
