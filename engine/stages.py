"""Training stages as a table: stage name -> the data it needs and how its trainer is built.

``STAGE_KINDS`` is import-light (checks and the UI use it); the builders import torch lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# stage -> kind of dataset it consumes (see data/dataset_info.yaml `kind`)
STAGE_KINDS: dict[str, str] = {"sft": "sft"}


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


def sft_trainer(ctx: StageContext, model):
    from transformers import Trainer

    from engine.collate import packed_collator

    train, evaluation = ctx.data
    # Padding-free batches: examples are concatenated into one row with restarting position_ids and
    # their boundaries (cu_seq_lens); engine.attention attends within each example, so no compute goes to padding,
    # and only trained positions are projected onto the vocabulary (engine.collate).
    collator = packed_collator(model)
    return Trainer(
        model=model,
        args=ctx.args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        processing_class=ctx.tokenizer,
        callbacks=ctx.callbacks,
    )


@dataclass(frozen=True)
class Stage:
    prepare_data: Callable[[StageContext], None]
    build_trainer: Callable[[StageContext, Any], Any]


STAGES: dict[str, Stage] = {"sft": Stage(sft_data, sft_trainer)}
