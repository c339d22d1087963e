"""Checkpoints and final/ are written to a temporary directory and renamed into place when complete.

transformers' Trainer writes ``checkpoint-N`` in place (model, optimizer, scheduler, RNG, trainer_state.json),
so a run killed during a save leaves a directory that looks like a checkpoint and is not one. The Trainer of
every stage gets the ``AtomicCheckpoints`` mixin: the Trainer's own ``_save_checkpoint`` writes into
``tmp-checkpoint-N/checkpoint-N`` (through ``_get_output_dir``), the run config is added, and the finished
directory is renamed to ``checkpoint-N``. A ``tmp-*`` directory that outlives its run is an incomplete save:
``resume_from=latest`` skips it and the resume reports it (``rundir.incomplete_checkpoints``).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from engine.run import rundir
from engine.train.stages import mix_in

log = logging.getLogger("engine.train")


class AtomicCheckpoints:
    """Trainer mixin (see the module docstring); ``protected`` names a checkpoint rotation must keep."""

    workbench_config_text = ""
    workbench_protected: str | None = None
    _staging: Path | None = None

    def _get_output_dir(self, trial):
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f"{rundir.STAGING}{name}"
        if self.args.should_save and staging.exists():
            log.info("replacing %s, an incomplete save of the same step", staging.name)
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every rank's shard is written
        if self.args.should_save:
            (staging / name / rundir.CONFIG).write_text(self.workbench_config_text, encoding="utf-8")
            rundir.replace_dir(staging / name, run_dir / name)
            staging.rmdir()
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint or self.workbench_protected,
                               use_mtime=True)
        self.accelerator.wait_for_everyone()


def atomic_saves(trainer, config_text: str, protected: Path | None = None):
    """Give ``trainer`` (of any stage's Trainer class) atomic checkpoint saves; returns it."""
    mix_in(trainer, AtomicCheckpoints, "Atomic")
    trainer.workbench_config_text = config_text
    trainer.workbench_protected = str(protected) if protected else None
    return trainer


def save_final(trainer, tokenizer, run_dir: Path, config_text: str, earlier_step: int | None = None) -> Path:
    """Write final/ through ``tmp-final``. An earlier final/ (a completed run trained further) is kept as
    checkpoint-<earlier_step> when no checkpoint holds that step; otherwise that checkpoint already has its weights."""
    final = run_dir / rundir.FINAL
    staging = run_dir / f"{rundir.STAGING}{rundir.FINAL}"
    main = trainer.is_world_process_zero()
    if main and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if main:
        tokenizer.save_pretrained(staging)
        (staging / rundir.CONFIG).write_text(config_text, encoding="utf-8")
        if final.exists() and earlier_step is not None:
            keep = run_dir / f"checkpoint-{earlier_step}"
            if not keep.exists():
                os.rename(final, keep)
                log.info("the earlier final/ (step %d) is kept as %s", earlier_step, keep.name)
            else:
                log.info("the earlier final/ (step %d) is replaced; %s holds the same weights", earlier_step, keep.name)
        rundir.replace_dir(staging, final)
    trainer.accelerator.wait_for_everyone()
    return final
