"""check(cfg) -> every problem with a run config at once, before any compute. Imports no torch.

The UI calls it before Start and the engine calls it again at startup.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from engine.run.config import RunConfig
from engine.train.stages import STAGE_KINDS

Problem = tuple[str, str]


def _model_problems(cfg: RunConfig) -> list[Problem]:
    path = Path(cfg.model.path)
    if not path.exists():
        hint = " (run `workbench prepare-model` to create the default model)" if path.name == "SmolLM2-135M-Instruct" else ""
        return [("model.path", f"model directory not found: {path}{hint}")]
    if not (path / "config.json").is_file():
        return [("model.path", f"{path} is not a Hugging Face model directory (no config.json)")]
    return []


def _layer_count(model_dir: Path) -> int | None:
    """Decoder layers of the model in ``model_dir``, read from its config.json (no weights loaded)."""
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for c in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(c.get(key), int):
                return c[key]
    return None


def _model_shape_problems(cfg: RunConfig) -> list[Problem]:
    """Problems that need the model's config.json: read after _model_problems found it, before any weights load."""
    path, m = Path(cfg.model.path), cfg.method
    if m.finetuning_type != "freeze" or not (path / "config.json").is_file():
        return []
    layers = _layer_count(path)
    if layers is not None and m.freeze_trainable_layers > layers:
        return [("method.freeze_trainable_layers", f"{m.freeze_trainable_layers} trainable layers, but {path.name} has only "
                 f"{layers} decoder layers: use at most {layers} (or finetuning_type full to train all of them)")]
    return []


def _vocab_problems(cfg: RunConfig) -> list[Problem]:
    """A vocabulary source that is missing, unreadable or empty. Tokens the model already has are no problem:
    the run skips them and logs how many."""
    if not cfg.model.extend_vocab:
        return []
    from engine.train.vocab import VocabError, read_tokens

    try:
        read_tokens(cfg.model.extend_vocab)
    except VocabError as err:
        return [("model.extend_vocab", str(err))]
    return []


def _method_problems(cfg: RunConfig) -> list[Problem]:
    m, q, out = cfg.method, cfg.model.quantization, []
    if m.stage not in STAGE_KINDS:
        out.append(("method.stage", f"stage '{m.stage}' is not available in this version (available: {', '.join(STAGE_KINDS)})"))
    if m.finetuning_type == "qlora" and q == "none":
        out.append(("model.quantization", "qlora trains adapters on a quantized base: set model.quantization to nf4, fp4 or int8"))
    if m.finetuning_type in ("full", "freeze") and q != "none":
        out.append(("model.quantization", f"{m.finetuning_type} tuning cannot update quantized weights: use quantization none, or finetuning_type qlora"))
    if q != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            out.append(("model.quantization", "quantization needs the bitsandbytes package, which is not installed (pip install bitsandbytes)"))
        if cfg.distributed.zero_stage == 3:
            out.append(("distributed.zero_stage", "ZeRO-3 cannot shard bitsandbytes-quantized weights: use zero_stage 0 or 2 with QLoRA"))
    if m.finetuning_type in ("lora", "qlora") and not m.lora_target.strip():
        out.append(("method.lora_target", "name the modules to adapt, or 'all-linear'"))
    if cfg.training.optim in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit") and importlib.util.find_spec("bitsandbytes") is None:
        out.append(("training.optim", f"{cfg.training.optim} needs bitsandbytes, which is not installed"))
    return out


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


def _stage_problems(cfg: RunConfig) -> list[Problem]:
    """Stage settings that cannot train, each with the reason."""
    m, t, out = cfg.method, cfg.training, []
    if m.stage == "rl":
        out += _reward_model_problems(m.reward_model)
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
    if m.stage == "kto" and t.per_device_train_batch_size < 2:
        out.append(("training.per_device_train_batch_size", "kto estimates its KL term from the other examples of a "
                    "batch: use a batch size of at least 2"))
    targets = {x.strip() for x in m.lora_target.split(",")}
    if m.stage in ("dpo", "kto") and m.finetuning_type in ("lora", "qlora") and "lm_head" in targets:
        out.append(("method.lora_target", f"{m.stage} reads log-probabilities from lm_head's weight directly, so an "
                    "adapter on lm_head would never train: leave lm_head out"))
    return out


def _data_problems(cfg: RunConfig) -> list[Problem]:
    from engine.data.errors import DataError
    from engine.data.registry import resolve_dataset

    if not cfg.data.datasets:
        return [("data.datasets", "choose at least one dataset")]
    need = STAGE_KINDS.get(cfg.method.stage)
    out = []
    for i, name in enumerate(cfg.data.datasets):
        try:
            spec = resolve_dataset(name, cfg.data.registry)
        except DataError as err:
            out.append((f"data.datasets[{i}]", str(err)))
            continue
        if need and spec.kind != need:
            out.append((f"data.datasets[{i}]", f"dataset '{name}' is {spec.kind} data, but stage {cfg.method.stage} needs {need} data"))
    return out


def _template_problems(cfg: RunConfig) -> list[Problem]:
    from engine.data.templates import template_names

    if cfg.model.template not in template_names():
        return [("model.template", f"unknown template '{cfg.model.template}' (known: {', '.join(template_names())})")]
    return []


def _distributed_problems(cfg: RunConfig, run_dir: Path | None) -> list[Problem]:
    d, out = cfg.distributed, []
    if d.devices and not re.fullmatch(r"\d+(,\d+)*", d.devices.replace(" ", "")):
        out.append(("distributed.devices", f"'{d.devices}' is not a list of GPU ids such as 0,1"))
    elif d.devices and len(d.devices.split(",")) != d.num_processes:
        out.append(("distributed.num_processes", f"{d.num_processes} processes for {len(d.devices.split(','))} devices ({d.devices}): use one process per device"))
    if d.offload and d.zero_stage == 0:
        out.append(("distributed.offload", "CPU offload needs DeepSpeed ZeRO stage 2 or 3"))
    if d.hostfile and not Path(d.hostfile).is_file():
        out.append(("distributed.hostfile", f"hostfile not found: {d.hostfile}"))
    r = cfg.training.resume_from
    if r:
        if r == "latest":
            from engine.run.rundir import latest_checkpoint

            if run_dir is None or latest_checkpoint(run_dir) is None:
                out.append(("training.resume_from", f"'latest' needs an existing run with a checkpoint, and {run_dir or 'output.run_dir'} has none"))
        elif not (Path(r) / "trainer_state.json").is_file():
            out.append(("training.resume_from", f"{r} is not a checkpoint directory (no trainer_state.json)"))
    return out


def check(cfg: RunConfig, run_dir: str | Path | None = None) -> list[Problem]:
    """Every problem with ``cfg`` as (field, message); empty when the run can start."""
    run_dir = Path(run_dir) if run_dir else (Path(cfg.output.run_dir) if cfg.output.run_dir else None)
    problems = _model_problems(cfg) + _method_problems(cfg) + _stage_problems(cfg) + _template_problems(cfg)
    problems += _model_shape_problems(cfg) + _vocab_problems(cfg)
    problems += _data_problems(cfg) + _distributed_problems(cfg, run_dir)
    return problems
