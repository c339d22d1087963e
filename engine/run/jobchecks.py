"""The checks of the evaluation and export jobs: every problem found before work starts. Imports no torch.

``launch.prepare`` runs them (through ``jobs.KINDS``) before a job directory is created, the job runs
them again when it starts, and the web UI calls them without importing the job modules. Checking an
adapter against its base builds the base on torch's meta device, so that check imports torch when called.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from engine.run.checkpoint import CheckpointError, check_adapter_base, resolve
from engine.run.jobconfig import EvalConfig, ExportConfig

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class ExportError(RuntimeError):
    """An export that cannot proceed or failed its verification."""


# ---------------------------------------------------------------- evaluation

def targets(cfg: EvalConfig) -> tuple[Path, list]:
    """(base model dir, [None for the base, then Checkpoint per checkpoint]); raises CheckpointError."""
    ckpts = [resolve(p, cfg.model.base or None, field=f"model.checkpoints[{i}]") for i, p in enumerate(cfg.model.checkpoints)]
    if cfg.model.base:
        base = Path(cfg.model.base).expanduser().resolve()
    else:
        base = next((c.base or c.path for c in ckpts), None)
        if base is None:
            raise CheckpointError("choose a base model or at least one checkpoint", "model.base")
    if not (base / "config.json").is_file():
        raise CheckpointError(f"base model not found: {base}", "model.base")
    for c in ckpts:
        if c.kind == "adapter":
            check_adapter_base(c, cfg.model.trust_remote_code)
    return base, ([None] if cfg.model.include_base or not ckpts else []) + ckpts


def load_eval_examples(cfg: EvalConfig) -> list[list[dict]]:
    """The conversations evaluated (the held-out split when data.val_size > 0); each must end with an answer."""
    from engine.data.errors import DataError
    from engine.data.loader import example_messages, load_examples
    from engine.data.registry import resolve_dataset

    for name in cfg.data.datasets:
        spec = resolve_dataset(name, cfg.data.registry)
        if spec.kind != "sft":
            raise DataError(f"dataset '{spec.name}' holds {spec.kind} data without reference answers; loss and BLEU/ROUGE need "
                            "an SFT dataset whose last assistant turn is the reference", field="data.datasets")
    examples = load_examples(cfg.data, "sft")
    if cfg.data.val_size > 0:
        n_eval = max(1, round(len(examples) * cfg.data.val_size))
        examples = examples.train_test_split(test_size=n_eval, seed=cfg.data.seed, shuffle=True)["test"]
    convs = [example_messages(row) for row in examples]
    empty = [i for i, m in enumerate(convs) if not m or m[-1]["role"] != "assistant" or not m[-1]["content"].strip()]
    if empty:
        raise DataError(f"{len(empty)} samples (first: #{empty[0] + 1}) have no reference answer (an empty last assistant "
                        "turn); BLEU/ROUGE need references", field="data.datasets")
    return convs


def check_eval(cfg: EvalConfig, job_dir: Path | None = None) -> list[tuple[str, str]]:
    """Problems found before work starts: checkpoints, base match, datasets with references, benchmark format."""
    from engine.jobs.choice_eval import BenchmarkError, read_benchmark
    from engine.data.errors import DataError

    problems = []
    if not any((cfg.tasks.loss, cfg.tasks.generation, cfg.tasks.choice, cfg.tasks.harness)):
        problems.append(("tasks", "choose at least one task: loss, generation, choice or harness"))
    try:
        targets(cfg)
    except CheckpointError as err:
        problems.append((err.field, str(err)))
    if cfg.tasks.loss or cfg.tasks.generation:
        try:
            load_eval_examples(cfg)
        except DataError as err:
            problems.append((err.field or "data.datasets", str(err)))
    if cfg.tasks.choice:
        try:
            read_benchmark(cfg.benchmark.file, cfg.benchmark.max_samples)
        except BenchmarkError as err:
            problems.append(("benchmark.file", str(err)))
    if cfg.tasks.harness:
        from engine.jobs.harness import check_tasks

        problems += [("harness.tasks", p) for p in check_tasks(cfg.harness.tasks)]
    return problems


# ---------------------------------------------------------------- export

def output_dir(cfg: ExportConfig) -> Path:
    return Path(cfg.output.dir or Path(cfg.output.job_dir) / "model").expanduser().resolve()


def _writable_parent(path: Path) -> Path:
    p = path
    while not p.exists():
        p = p.parent
    return p


def count_parameters(model_dir: Path, trust_remote_code: bool = False) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def estimate_bytes(cfg: ExportConfig, n_params: int) -> int:
    from engine.jobs.gguf import BYTES_PER_PARAM, plan

    per_param = _BYTES[cfg.output.dtype] + sum(BYTES_PER_PARAM[q] for q in cfg.output.gguf)
    if cfg.output.gguf:
        source, kept = plan(cfg.output.gguf, cfg.output.dtype)
        per_param += 0 if kept else BYTES_PER_PARAM[source]  # the quantizer's 16/32-bit source, while it works
    return int(n_params * per_param * 1.05) + 50_000_000


def check_export(cfg: ExportConfig, job_dir: Path | None = None) -> list[tuple[str, str]]:
    """Every problem found before work starts: checkpoint, base match, output dir, disk space."""
    problems: list[tuple[str, str]] = []
    tools = None
    if cfg.output.gguf:  # first: a missing optional install is named even before a checkpoint is chosen
        from engine.jobs.gguf import tools_problem  # torch-free

        tools = tools_problem()
        problems += [("output.gguf", tools)] if tools else []
    if not cfg.model.checkpoint:
        return problems + [("model.checkpoint", "choose a checkpoint to export")]
    try:
        ckpt = resolve(cfg.model.checkpoint, cfg.model.base or None)
        check_adapter_base(ckpt, cfg.model.trust_remote_code)
    except CheckpointError as err:
        return problems + [(err.field, str(err))]
    from engine.jobs.hub import OFFLINE_HINT, offline

    if cfg.hub.repo_id and offline():
        problems.append(("hub.repo_id", f"push to {cfg.hub.repo_id} is not possible: {OFFLINE_HINT}; or leave the "
                         "repository empty to export only"))
    out = output_dir(cfg) if (cfg.output.dir or cfg.output.job_dir) else None
    if out is not None:
        if out.exists() and not out.is_dir():
            problems.append(("output.dir", f"{out} is a file, not a directory"))
        elif out.is_dir() and any(out.iterdir()) and not cfg.output.overwrite:
            problems.append(("output.dir", f"{out} exists and is not empty; choose another directory or set output.overwrite=true"))
        if out in (ckpt.path, ckpt.base) or ckpt.path.is_relative_to(out):
            problems.append(("output.dir", f"{out} would overwrite the checkpoint or base model being exported"))
        parent = _writable_parent(out)
        if not os.access(parent, os.W_OK | os.X_OK):
            problems.append(("output.dir", f"{parent} is not writable"))
        else:
            need = estimate_bytes(cfg, count_parameters(ckpt.base or ckpt.path, cfg.model.trust_remote_code))
            free = shutil.disk_usage(parent).free
            if free < need:
                problems.append(("output.dir", f"not enough disk space at {parent}: the export needs about "
                                               f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB free"))
    if cfg.output.gguf and not tools:
        from engine.jobs.gguf import gguf_problems  # torch-free: the architecture is one llama.cpp's converter knows

        problems += [("output.gguf", m) for m in gguf_problems(ckpt.base or ckpt.path)]
    return problems
