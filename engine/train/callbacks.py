"""Trainer callbacks: metrics to JSONL, status.json progress, graceful stop on SIGTERM."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import psutil
import torch
from transformers import TrainerCallback

from engine.run import rundir


def _gather(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` in rank order (a collective on GPUs: each rank must call it), or just ours."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [values]
    mine = torch.tensor(values, dtype=torch.float64, device=torch.device("cuda", torch.cuda.current_device()))
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def memory_record(cuda=None, gather=_gather) -> dict:
    """The memory fields of a metrics row. On GPUs: each rank's peak allocated and reserved memory since the start
    (``gpu_allocated_mb`` / ``gpu_reserved_mb``, MB in rank order) and ``memory_mb``, the largest peak allocated; every
    rank must call it then. On CPU: ``memory_mb``, this process's resident memory."""
    cuda = torch.cuda if cuda is None else cuda
    if not cuda.is_available():
        return {"memory_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}
    ranks = gather([cuda.max_memory_allocated() / 2**20, cuda.max_memory_reserved() / 2**20])
    allocated, reserved = [round(r[0], 1) for r in ranks], [round(r[1], 1) for r in ranks]
    return {"memory_mb": max(allocated), "gpu_allocated_mb": allocated, "gpu_reserved_mb": reserved}


class GracefulStop(TrainerCallback):
    """SIGTERM/SIGINT ask the run to finish its step, save a checkpoint and stop."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def _agreed(self) -> bool:
        # Every rank must stop at the same step, or the next collective hangs.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if self.requested else 0.0])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return bool(flag.item())
        return self.requested

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            self.requested = True
            control.should_save = True
            control.should_training_stop = True


class RunReporter(TrainerCallback):
    """Appends one row per log step to metrics.jsonl and keeps status.json current (rank 0 only).

    A row keeps every finite number the trainer logs under the trainer's own name (TRL's ``rewards/margins``,
    ``eval_accuracy``, ...), next to the progress fields (step, tokens, speed, ETA, memory).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.metrics = self.run_dir / rundir.METRICS
        self.t0 = time.time()
        self.step0 = 0
        self.tokens0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.t0, self.step0, self.tokens0 = time.time(), state.global_step, state.num_input_tokens_seen
        rundir.update_status(self.run_dir, state="running", step=state.global_step, total_steps=state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "train_loss" in logs:
            return  # the end-of-training summary is not a step
        progress = "loss" in logs or not any(k.startswith("eval_") for k in logs)
        memory = memory_record() if progress else {}  # every rank takes part: GPU memory is gathered per rank
        if not state.is_world_process_zero:
            return
        now = time.time()
        elapsed = now - self.t0
        done = state.global_step - self.step0
        tokens = state.num_input_tokens_seen - self.tokens0
        row = {"step": state.global_step, "total_steps": state.max_steps, "epoch": round(state.epoch or 0.0, 4)}
        for key, value in logs.items():
            if key in ("epoch", "total_flos", "num_input_tokens_seen") or key.startswith("train_"):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                row[key] = value
        if progress:
            if state.num_input_tokens_seen:  # not counted by every trainer (ORPO)
                row.update(tokens=state.num_input_tokens_seen,
                           tokens_per_s=round(tokens / elapsed, 2) if elapsed > 0 else None)
            row.update(
                elapsed_s=round(elapsed, 2),
                eta_s=round(elapsed / done * (state.max_steps - state.global_step), 1) if done else None,
                **memory,
            )
        row["time"] = now
        rundir.append_jsonl(self.metrics, row)
        rundir.update_status(self.run_dir, step=state.global_step, total_steps=state.max_steps)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class StartupClock(TrainerCallback):
    """The start-up breakdown in train.log: the seconds from the process start to each ``mark`` (imports, data,
    model, trainer set-up), then to the end of the first optimizer step, written once as one line."""

    def __init__(self, log):
        self.log, self.last = log, psutil.Process().create_time()
        self.parts: list[tuple[str, float]] = []
        self.started = self.last

    def mark(self, name: str) -> None:
        now = time.time()
        self.parts.append((name, now - self.last))
        self.last = now

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step and not any(name == "first step" for name, _ in self.parts):
            self.mark("first step")
            said = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.parts)
            self.log.info("start-up: %s (%.1f s from process start to the first step's end)", said,
                          self.last - self.started)
