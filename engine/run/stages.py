"""The stage table: one row per training stage, the one place its facts are written. Imports no torch and no TRL.

A row names the kind of dataset the stage trains on, a one-line description, the method fields only it reads
(the form shows them only while it is chosen), the metric panels drawn under its loss curve (one panel per
tuple, one line per metric; an ``eval_`` metric is read from the evaluation rows), and its own checks (every
problem at once, before any compute). From it come the ``Stage`` type of the run config, the checks, the form's
per-stage fields and the plots; ``engine.train.stages`` holds one trainer builder per row.

Adding a stage: a row here, a builder in ``engine/train/stages.py``, ``stages.<name>`` in both locale files of
the web UI, and an example config in ``configs/examples/`` (tests/unit/test_stage_table.py checks all four).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from engine.run.config import RunConfig

Problem = tuple[str, str]


def _no_checks(cfg: RunConfig) -> list[Problem]:
    return []


@dataclass(frozen=True)
class StageRow:
    name: str
    kind: str  # the dataset kind it trains on (a registry entry's `kind`)
    description: str
    fields: tuple[str, ...] = ()  # method fields only this stage reads, e.g. "method.beta"
    metrics: tuple[tuple[str, ...], ...] = ()  # panels drawn under the loss
    checks: Callable[[RunConfig], list[Problem]] = _no_checks
    packed: bool = False  # trained by PackedTrainer on packed batches: batch_by: tokens and auto checkpointing apply


def _lm_head_adapter(cfg: RunConfig) -> list[Problem]:
    m = cfg.method
    if m.finetuning_type in ("lora", "qlora") and "lm_head" in {x.strip() for x in m.lora_target.split(",")}:
        return [("method.lora_target", f"{m.stage} reads log-probabilities from lm_head's weight directly, so an "
                 "adapter on lm_head would never train: leave lm_head out")]
    return []


def _kto_checks(cfg: RunConfig) -> list[Problem]:
    out = []
    if cfg.training.per_device_train_batch_size < 2:
        out.append(("training.per_device_train_batch_size", "kto estimates its KL term from the other examples of a "
                    "batch: use a batch size of at least 2"))
    return out + _lm_head_adapter(cfg)


def _reward_model_problems(path: str) -> list[Problem]:
    field = "method.reward_model"
    if not path.strip():
        return [(field, "rl optimises the model against a reward model: set method.reward_model to the final/ or "
                        "checkpoint-N directory of an rm run")]
    from engine.run.checkpoint import CheckpointError, resolve

    try:
        ckpt = resolve(path, field=field, generative=False)
    except CheckpointError as err:
        return [(field, str(err))]
    if ckpt.reward_model:
        return []
    if ckpt.run_config is not None:
        return [(field, f"{ckpt.path} is a checkpoint of a {ckpt.stage or 'sft'} run; the reward model must come from an rm run")]
    return [(field, f"{ckpt.path} is not a reward model (no sequence-classification score head)")]


def _rl_checks(cfg: RunConfig) -> list[Problem]:
    m, t = cfg.method, cfg.training
    out = _reward_model_problems(m.reward_model)
    group = t.per_device_train_batch_size * t.gradient_accumulation_steps * cfg.distributed.num_processes
    if group % m.num_generations:
        out.append(("method.num_generations", f"rl compares {m.num_generations} completions per prompt, so batch size "
                    f"× accumulation × processes ({group}) must be a multiple of {m.num_generations}"))
    elif cfg.data.val_size > 0 and (t.per_device_train_batch_size * cfg.distributed.num_processes) % m.num_generations:
        out.append(("training.per_device_train_batch_size", f"rl evaluates whole groups of {m.num_generations} "
                    "completions: with val_size > 0, batch size × processes must be a multiple of num_generations"))
    if m.max_new_tokens >= cfg.data.cutoff_len:
        out.append(("method.max_new_tokens", f"{m.max_new_tokens} new tokens leave no room for a prompt within "
                    f"cutoff_len={cfg.data.cutoff_len}"))
    return out


ROWS: tuple[StageRow, ...] = (
    StageRow("sft", "sft", "supervised fine-tuning on conversations", packed=True),
    StageRow("pt", "pretrain", "continued pretraining on plain text, packed", packed=True),
    StageRow("rm", "preference", "a reward model: a scalar score head trained on preference pairs",
             metrics=(("accuracy", "eval_accuracy"), ("margin", "eval_margin"))),
    StageRow("dpo", "preference", "direct preference optimisation on preference pairs",
             fields=("method.beta", "method.dpo_loss", "method.sft_weight"),
             metrics=(("rewards/chosen", "rewards/rejected"), ("rewards/margins",), ("rewards/accuracies",)),
             checks=_lm_head_adapter),
    StageRow("kto", "kto", "KTO on answers labelled good or bad",
             fields=("method.beta", "method.desirable_weight", "method.undesirable_weight"),
             metrics=(("rewards/chosen", "rewards/rejected"), ("rewards/margins",), ("kl",)),
             checks=_kto_checks),
    StageRow("orpo", "preference", "ORPO: SFT plus an odds-ratio preference term, no reference model",
             fields=("method.beta",),
             metrics=(("nll_loss",), ("log_odds_ratio",), ("rewards/margins",))),
    # rl reads the prompts of preference data; GRPO against a reward model trained by the rm stage
    StageRow("rl", "preference", "online RL: GRPO against a reward model from an rm run",
             fields=("method.reward_model", "method.num_generations", "method.max_new_tokens", "method.kl_beta"),
             metrics=(("reward",), ("kl",), ("completions/mean_length",)),
             checks=_rl_checks),
)
STAGES: dict[str, StageRow] = {row.name: row for row in ROWS}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
STAGE_KINDS: dict[str, str] = {row.name: row.kind for row in ROWS}


def stage_fields() -> list[str]:
    """Every stage-only field, in the order the rows name them (the form's stage group)."""
    return list(dict.fromkeys(f for row in ROWS for f in row.fields))


def stages_of(key: str) -> list[str] | None:
    """The stages that read a stage-only field, or None for a field every stage reads."""
    names = [row.name for row in ROWS if key in row.fields]
    return names or None


def batch_fill(cfg: RunConfig) -> tuple[str, int]:
    """What fills one training batch per device: ("tokens", cutoff_len × per-device batch) with
    ``training.batch_by: tokens`` on a packed stage, else ("examples", the per-device batch size)."""
    t = cfg.training
    if t.batch_by == "tokens" and STAGES[cfg.method.stage].packed:
        return "tokens", cfg.data.cutoff_len * t.per_device_train_batch_size
    return "examples", t.per_device_train_batch_size


def stage_problems(cfg: RunConfig) -> list[Problem]:
    """The chosen stage's own checks."""
    return STAGES[cfg.method.stage].checks(cfg)
