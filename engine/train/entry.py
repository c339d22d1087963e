"""`python -m engine.train RUN_DIR/config.yaml`: parse, check, build, train, save. Run by the DeepSpeed launcher.

Reports only through the run directory: status.json, metrics.jsonl, train.log (stdout), checkpoints.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from engine.run import rundir
from engine.run.config import ConfigError, RunConfig, load_config

log = logging.getLogger("engine.train")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def deepspeed_config(cfg: RunConfig, universal: bool = False) -> dict | None:
    """The ZeRO config of the run; ``universal``: the resume checkpoint is loaded from DeepSpeed's universal format
    (it was saved by another number of ranks)."""
    d = cfg.distributed
    if d.zero_stage == 0:
        return None
    name = f"zero{d.zero_stage}{'_offload' if d.offload else ''}.json"
    out = json.loads((CONFIGS / "deepspeed" / name).read_text())
    if universal:
        out["checkpoint"] = {**out.get("checkpoint", {}), "load_universal": True}
    return out


def universal_resume(cfg: RunConfig, resume: str | None) -> bool:
    """Whether this resume loads a universal checkpoint: its ZeRO shards come from another world size. The supervisor
    (engine.run.launch) has converted it; without that folder the ranks could not load it, which is said here."""
    from engine.run.checkpoint import needs_universal, universal_dir, zero_shards

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not resume or cfg.distributed.zero_stage == 0 or not needs_universal(Path(resume), world):
        return False
    if universal_dir(Path(resume)) is None:
        tag, saved = zero_shards(Path(resume))
        raise ConfigError([("training.resume_from", f"{Path(resume).name} was saved by {saved} ranks and this run has "
                            f"{world}, and it has no universal copy ({tag}_universal): start the run with workbench "
                            "(its launcher converts the checkpoint first), or convert it with "
                            "python -m deepspeed.checkpoint.ds_to_universal")])
    return True


def training_arguments(cfg: RunConfig, run_dir: Path, precision: str, has_eval: bool, cls=None, universal: bool = False,
                       **stage_fields):
    """The run's TrainingArguments, or the stage's subclass ``cls`` (a TRL config) with its own ``stage_fields``."""
    import torch
    from transformers import TrainingArguments

    t = cfg.training
    cuda = torch.cuda.is_available()
    common = dict(
        output_dir=str(run_dir),
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a value below 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        # PyTorch's fused AdamW (CPU and GPU): the same update in one kernel per parameter list, not a dozen per
        # parameter (the default LoRA's 420 adapter tensors: 12.5 -> 2.6 ms a step on a 2-core CPU)
        optim="adamw_torch_fused" if t.optim == "adamw_torch" else t.optim,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing == "on",  # auto: set once the model is loaded (checkpointing())
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing == "on" else None,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(t.eval_steps or t.save_steps) if has_eval else None,
        report_to=list(t.report_to),  # engine.train.trackers
        run_name=run_dir.name,
        neftune_noise_alpha=t.neftune_noise_alpha or None,
        use_cpu=not cuda,
        ddp_backend=None if cuda else "gloo",
        ddp_find_unused_parameters=False,
        ddp_timeout=cfg.distributed.timeout,  # a rank lost on another node fails the run after this, not 30 min
        deepspeed=deepspeed_config(cfg, universal),
        include_num_input_tokens_seen="all",  # batches are padding-free, so every input token is real
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return (cls or TrainingArguments)(**{**common, **stage_fields})


def trainer_is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _threads() -> None:
    import torch

    if "WORKBENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["WORKBENCH_THREADS"]))
    elif not torch.cuda.is_available():
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))


def run(cfg: RunConfig, run_dir: Path, config_text: str) -> str:
    """Train; returns the final state ('completed' or 'stopped')."""
    import torch
    from transformers import set_seed

    from engine.train.callbacks import GracefulStop, RunReporter, StartupClock
    from engine.data.templates import get_template
    from engine.train.model_setup import (compute_dtype, frozen_base, load_base_model, load_tokenizer,
                                          resolve_precision, setup_finetuning)
    from engine.train.saving import atomic_saves, save_final
    from engine.train.stages import STAGES, StageContext
    from engine.run.dslaunch import import_deepspeed

    import_deepspeed()  # every rank runs under DeepSpeed; imported here once, without its autotuner's mlflow
    clock = StartupClock(log)
    clock.mark("imports")
    stop = GracefulStop()
    _threads()
    set_seed(cfg.training.seed)
    precision = resolve_precision(cfg.training)
    log.info("precision %s, %d threads, world size %s", precision, torch.get_num_threads(), os.environ.get("WORLD_SIZE", "1"))

    tokenizer = load_tokenizer(cfg.model)
    vocab = {}
    if cfg.model.extend_vocab:  # before any encoding, so the data uses the new tokens
        from engine.train.vocab import extend_tokenizer, sample_text

        vocab = extend_tokenizer(tokenizer, cfg.model.extend_vocab, sample_text(cfg.data))
        log.info("vocabulary: %s", json.dumps(vocab, ensure_ascii=False))
    template = get_template(cfg.model.template, tokenizer)
    if cfg.model.template != "auto":
        tokenizer.chat_template = template.jinja()  # saved with every checkpoint, so chat uses the same format

    stage = STAGES[cfg.method.stage]
    ctx = StageContext(cfg=cfg, run_dir=run_dir, tokenizer=tokenizer, template=template)
    stage.prepare_data(ctx)
    if vocab:
        ctx.stats["vocab"] = vocab
    log.info("data: %s", json.dumps(ctx.stats, ensure_ascii=False))
    clock.mark("data")
    if stop.requested:
        return "stopped"

    resume, earlier = cfg.training.resume_from or None, None
    if resume:
        for path in rundir.incomplete_checkpoints(run_dir):
            log.warning("%s is an incomplete save (the run was killed while writing it); it is not resumed from "
                        "and is left for you to delete", path)
        if resume == "latest":
            resume = str(rundir.resumable_checkpoint(run_dir))
        if (run_dir / rundir.FINAL).is_dir():  # a completed run trained further: keep its final weights
            earlier = rundir.resumable_checkpoint(run_dir)
    universal = universal_resume(cfg, resume)
    if resume:
        log.info("resuming from %s%s", resume, " (DeepSpeed universal checkpoint: saved by another world size)" if universal else "")
    ctx.args = training_arguments(cfg, run_dir, precision, has_eval=ctx.data[1] is not None, universal=universal,
                                  **stage.arguments(cfg))
    compute = compute_dtype(precision)
    from engine.train.attention import register

    attn = register()
    log.info("attention for packed batches: %s", attn)
    from engine.run.hardware import allocator_in_use

    log.info("memory allocator: %s", allocator_in_use())
    model = load_base_model(cfg.model, compute, attn=attn, head=stage.head, frozen=frozen_base(cfg, stage.head))
    qcfg = getattr(model.config, "quantization_config", None)
    log.info("base model %s: quantization=%s, 4-bit=%s, 8-bit=%s, dtype=%s, compute dtype=%s", cfg.model.path,
             cfg.model.quantization, getattr(model, "is_loaded_in_4bit", False), getattr(model, "is_loaded_in_8bit", False),
             model.dtype, getattr(qcfg, "bnb_4bit_compute_dtype", compute))
    if vocab:
        from engine.train.vocab import resize_embeddings

        resize_embeddings(model, len(tokenizer), known=vocab["base_size"])
    model = setup_finetuning(model, cfg.method, cfg.training.gradient_checkpointing == "on", train_embeddings=bool(vocab),
                             head=stage.head)
    from transformers.integrations import is_deepspeed_zero3_enabled

    from engine.train.activations import apply_auto, fused_lora, recompute_cheap_parts, recompute_within

    log.info("recomputed in the backward pass instead of kept: the outputs of %d norms and %d gated MLPs' act(gate) * up",
             *recompute_cheap_parts(model, norms=not is_deepspeed_zero3_enabled()))
    if adapted := fused_lora(model):
        log.info("LoRA layers adding their product in place (one node over a frozen linear base; input kept once under autocast): %d", adapted)
    if cfg.training.gradient_checkpointing == "auto":
        log.info("gradient checkpointing (auto): %s", apply_auto(ctx.args, model, cfg))
    clock.mark("model")
    from engine.train.model_setup import keep_initial_adapter

    initial_adapter = keep_initial_adapter(model, cfg.method, run_dir) if trainer_is_main() else None
    ctx.callbacks = [RunReporter(run_dir), stop, clock]
    if cfg.training.report_to:
        from engine.train.trackers import tracker_env

        tracker_env(run_dir)
    trainer = recompute_within(atomic_saves(stage.build_trainer(ctx, model), config_text, protected=earlier))
    from engine.train.stages import describe_batch

    log.info("training batch per device: %s", describe_batch(cfg))
    if cfg.training.report_to:
        from engine.train.trackers import guard_trackers

        guard_trackers(trainer, run_dir, cfg.model_dump(mode="json"), config_text)
    if cfg.method.loraplus_lr_ratio > 0:
        from engine.train.model_setup import loraplus_optimizer

        loraplus_optimizer(trainer, cfg.method.loraplus_lr_ratio)
    clock.mark("trainer set-up")
    trainer.train(resume_from_checkpoint=resume)
    if stop.requested:
        return "stopped"
    if initial_adapter is not None:  # PiSSA/OLoRA: final/ is converted to a plain LoRA that fits the original base
        import functools

        trainer.model.save_pretrained = functools.partial(
            trainer.model.save_pretrained, path_initial_model_for_weight_conversion=str(initial_adapter))
    save_final(trainer, tokenizer, run_dir, config_text, int(earlier.name.split("-")[1]) if earlier else None)
    return "completed"


BNB_OPTIMS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def skip_bitsandbytes(cfg: RunConfig) -> bool:
    """Keep a run that neither quantizes nor uses a bitsandbytes optimizer from importing bitsandbytes. PEFT imports
    it whenever it is installed, and it imports torch._inductor: measured, the rank alone spent 11.0 and 12.2 s in
    imports without it against 13.1 and 14.0 s with it (a loaded 2-core machine, load 6). A ``None``
    in ``sys.modules`` makes ``importlib.util.find_spec`` answer None, which is how PEFT, Accelerate and Transformers
    ask whether it is installed, so they all go on without it. True when it was kept out."""
    if cfg.model.quantization != "none" or cfg.training.optim in BNB_OPTIMS or "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = [a for a in argv if not a.startswith("--local_rank")]
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args) != 1:
        print("usage: python -m engine.train RUN_DIR/config.yaml", file=sys.stderr)
        return 2
    config_path = Path(args[0]).resolve()
    run_dir = config_path.parent
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = load_config(config_path)
        from engine.run.checks import check, warnings

        problems = check(cfg, run_dir)
        if problems:
            raise ConfigError(problems, str(config_path))
        if is_main:  # settings that run but likely not as wanted here: train.log and the run card
            said = [f"{field}: {message}" for field, message in warnings(cfg)]
            for line in said:
                log.warning("%s", line)
            if said:
                rundir.update_status(run_dir, warnings=said)
        skip_bitsandbytes(cfg)
        state = run(cfg, run_dir, config_path.read_text(encoding="utf-8"))
        if is_main:
            rundir.update_status(run_dir, state=state, ended_at=time.time(), error=None, error_kind=None)
        log.info("run %s", state)
        return 0
    except BaseException as err:  # noqa: BLE001 - every failure is reported in status.json
        traceback.print_exc()
        kind, message = rundir.classify(err)
        print(f"[workbench] run failed ({kind}): {message}", flush=True)
        current = rundir.read_status_raw(run_dir)
        if current is None or current.state != "failed":
            try:
                rundir.update_status(run_dir, state="failed", ended_at=time.time(), error=message, error_kind=kind)
            except OSError as write_err:  # the run directory itself is what failed; train.log has the line above
                print(f"[workbench] status.json not updated: {write_err}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
