"""Standard benchmarks through lm-evaluation-harness (``lm_eval``): named tasks on the base model and each checkpoint.

A task is any task or group ``lm_eval`` knows (arc_easy, hellaswag, mmlu, ...) or one of the project's own
task YAMLs in ``data/benchmarks/harness/``, which read local files (their ``data_files`` are relative to
the YAML's folder), so benchmarks run offline. ``check_tasks`` refuses, before any model loads, a task
``lm_eval`` does not know and one whose data lives on the Hugging Face Hub when the Hub cannot be reached.

The model is handed to ``lm_eval`` already loaded (``HFLM(pretrained=<model>)``): an adapter checkpoint
is its PeftModel on the 16/32-bit base, as the other evaluation tasks load it, a merged export or full
checkpoint its own weights.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
HARNESS_DIR = ROOT / "data" / "benchmarks" / "harness"
LOCAL_LOADERS = {"json", "csv", "parquet", "text", "arrow"}  # datasets' builders that read local data_files


class HarnessError(ValueError):
    """A harness task that cannot run here; the message names the task and why."""


@lru_cache(maxsize=2)
def task_manager(builtin: bool = True):
    """lm_eval's task index with the project's task YAMLs (built once per process; with ``builtin`` it reads
    lm_eval's ~15k task YAMLs, which takes a while, so project tasks alone are indexed without them)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(HARNESS_DIR), include_defaults=builtin)


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached (None when it can)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        return f"{host} is unreachable ({err})"
    return None


def _local(cfg: dict, where: Path | None) -> dict:
    """A task config whose relative data_files are made absolute (relative to its YAML's folder)."""
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if where is None or files is None:
        return cfg
    fix = lambda f: str((where / f).resolve()) if not Path(f).is_absolute() else f  # noqa: E731
    if isinstance(files, dict):
        files = {k: [fix(f) for f in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
    else:
        files = [fix(f) for f in files] if isinstance(files, list) else fix(files)
    return dict(cfg, dataset_kwargs=dict(kwargs, data_files=files))


def _leaves(name: str, seen: set[str]) -> list[tuple[str, dict]]:
    """(task name, config) of every task a task, group or tag name stands for."""
    entry = task_manager().task_index.get(name)
    if entry is None or name in seen:
        return []
    seen.add(name)
    cfg = entry.cfg or {}
    if "dataset_path" in cfg or entry.kind.name in ("TASK", "PY_TASK"):
        return [(name, cfg)]
    members = cfg.get("task") or []
    if entry.kind.name == "TAG":
        members = [n for n, e in task_manager().task_index.items() if name in (e.tags or ())]
    out = []
    for member in members if isinstance(members, list) else [members]:
        if isinstance(member, str):
            out += _leaves(member, seen)
        elif isinstance(member, dict) and isinstance(member.get("task"), str):
            out += _leaves(member["task"], seen) or [(member["task"], member)]
    return out


def check_tasks(names: list[str]) -> list[str]:
    """One sentence per task that cannot run here (unknown to lm_eval, or needing a Hub it cannot reach)."""
    if not names:
        return ["name at least one harness task (e.g. workbench_mcq_demo, or arc_easy where the Hub is reachable)"]
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return ["lm-evaluation-harness is not installed (pip install lm-eval==0.4.13, or make setup)"]
    if set(names) <= set(project_tasks()):  # local files: no need to index lm_eval's thousands of task YAMLs
        return []
    index = task_manager().task_index
    problems, hub_why = [], None
    for name in names:
        if name not in index:
            problems.append(f"harness task '{name}' is not known to lm-evaluation-harness (nor among the project's "
                            f"tasks in {HARNESS_DIR.relative_to(ROOT)}: {', '.join(project_tasks())})")
            continue
        for leaf, cfg in _leaves(name, set()):
            path = str(cfg.get("dataset_path") or "")
            if not path or path in LOCAL_LOADERS or Path(path).expanduser().exists():
                continue
            hub_why = hub_why or _hub_unreachable() or "ok"
            if hub_why != "ok":
                via = f" (part of '{name}')" if leaf != name else ""
                problems.append(f"harness task '{leaf}'{via} needs dataset '{path}' from the Hugging Face Hub, and "
                                f"{hub_why}")
                break
    return problems


def project_tasks() -> list[str]:
    """The task names of the project's own harness YAMLs."""
    import yaml

    names = []
    for path in sorted(HARNESS_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if isinstance(data.get("task"), str):
            names.append(data["task"])
    return names


def _spec(name: str, manager):
    """What simple_evaluate is given for a name: the project's tasks as configs with absolute data files."""
    entry = manager.task_index[name]
    path = entry.yaml_path
    if path is not None and Path(path).resolve().parent == HARNESS_DIR.resolve() and entry.cfg:
        return _local(dict(entry.cfg), HARNESS_DIR)
    return name


def run(model, tokenizer, names: list[str], num_fewshot: int, limit: int | None, batch_size: int,
        chat_template: bool, seed: int = 0) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm_eval's results (stderr and aliases left out; groups included)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(builtin=not set(names) <= set(project_tasks()))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    out = simple_evaluate(model=lm, tasks=[_spec(n, manager) for n in names], num_fewshot=num_fewshot, limit=limit,
                          task_manager=manager, apply_chat_template=chat_template, bootstrap_iters=0,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          log_samples=False)
    results = {}
    for task, metrics in (out or {}).get("results", {}).items():
        kept = {k.split(",")[0]: float(v) for k, v in metrics.items()
                if isinstance(v, (int, float)) and "stderr" not in k and k != "samples"}
        if kept:
            results[task] = kept
    return results
