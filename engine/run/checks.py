"""check(cfg) -> every problem with a run config at once, before any compute. Imports no torch.

The UI calls it before Start and the engine calls it again at startup.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from engine.run.config import DEFAULT_MODEL, RunConfig
from engine.run.stages import STAGE_KINDS, stage_problems

Problem = tuple[str, str]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken")


def model_dir_problem(path: str | Path, tokenizer_dir: str | Path | None = None) -> str | None:
    """Why ``path`` cannot be loaded as a Hugging Face model (missing, config.json unreadable or not JSON, no
    tokenizer files in ``tokenizer_dir`` or ``path``), read without any weights; None when it can."""
    import json

    path = Path(path)
    if not path.exists():
        hint = " (run `workbench prepare-model` to create the default model)" if path.name == Path(DEFAULT_MODEL).name else ""
        return f"model directory not found: {path}{hint}"
    if not (path / "config.json").is_file():
        return f"{path} is not a Hugging Face model directory (no config.json)"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        return f"{path / 'config.json'} cannot be read ({err})"
    except ValueError as err:
        return f"{path / 'config.json'} is not valid JSON ({err})"
    if not isinstance(config, dict) or not isinstance(config.get("model_type", ""), str):
        return f"{path / 'config.json'} is not a model config (a JSON object with model_type)"
    tok = Path(tokenizer_dir or path)
    if not any((tok / name).is_file() for name in TOKENIZER_FILES):
        return f"{tok} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...): copy the tokenizer of the model next to its weights"
    return None


def module_names(model_dir: Path) -> set[str] | None:
    """Names of the modules holding weights, from the safetensors headers (or the shard index), no weights read;
    None when the model has no safetensors files to read them from."""
    import json
    import struct

    index = model_dir / "model.safetensors.index.json"
    try:
        if index.is_file():
            keys = json.loads(index.read_text(encoding="utf-8"))["weight_map"].keys()
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                return None
            keys = []
            for file in files:
                with open(file, "rb") as f:
                    (size,) = struct.unpack("<Q", f.read(8))
                    keys += [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return {k.rsplit(".", 1)[0] for k in keys if "." in k}


def _lora_target_problems(cfg: RunConfig) -> list[Problem]:
    """lora_target names every module it lists, as PEFT matches them (the name or a dotted suffix of it)."""
    m, path = cfg.method, Path(cfg.model.path)
    target = m.lora_target.strip()
    if m.finetuning_type not in ("lora", "qlora") or not target or target == "all-linear":
        return []
    modules = module_names(path)
    if modules is None:
        return []
    if "lm_head" not in modules:  # a tied lm_head is stored as the embedding only
        modules.add("lm_head")
    wanted = [t.strip() for t in target.split(",") if t.strip()]
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in modules)]
    if not missing:
        return []
    leaves = sorted({n.rsplit(".", 1)[-1] for n in modules if not n.rsplit(".", 1)[-1].isdigit()})
    return [("method.lora_target", f"{path.name} has no module named {', '.join(missing)} (its modules: "
             f"{', '.join(leaves[:20])}); use those names or 'all-linear'")]


def _model_problems(cfg: RunConfig) -> list[Problem]:
    problem = model_dir_problem(cfg.model.path)
    return [("model.path", problem)] if problem else _lora_target_problems(cfg)


def _config_int(model_dir: Path, *keys: str) -> int | None:
    """The first of ``keys`` found in the model's config.json (or its text_config); no weights loaded."""
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for c in (config, config.get("text_config") or {}):
        for key in keys:
            if isinstance(c.get(key), int):
                return c[key]
    return None


def _layer_count(model_dir: Path) -> int | None:
    return _config_int(model_dir, "num_hidden_layers", "n_layer", "num_layers")


def context_length(model_dir: str | Path) -> int | None:
    """The model's trained context length (max_position_embeddings), from its config.json."""
    return _config_int(Path(model_dir), "max_position_embeddings", "n_positions", "max_sequence_length")


def rope_warning(cfg: RunConfig) -> str | None:
    """A sentence when cutoff_len exceeds the model's context length and no rope_scaling stretches it."""
    ctx = context_length(cfg.model.path)
    if cfg.model.rope_scaling == "none" and ctx and cfg.data.cutoff_len > ctx:
        return (f"data.cutoff_len={cfg.data.cutoff_len} is beyond the {ctx}-token context of {Path(cfg.model.path).name} "
                f"and model.rope_scaling is none: positions past {ctx} are untrained (set rope_scaling linear, dynamic "
                f"or yarn with rope_factor {-(-cfg.data.cutoff_len // ctx)})")
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


# PEFT version from which DoRA layers wrap bitsandbytes 4/8-bit weights (peft/tuners/lora/bnb.py)
DORA_QUANTIZED_PEFT = (0, 10)
_WANDB_OFFLINE = ("offline", "dryrun", "disabled")


def _peft_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in re.findall(r"\d+", version("peft"))[:2])


def _wandb_logged_in() -> bool:
    import netrc
    import os

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _tracker_problems(cfg: RunConfig) -> list[Problem]:
    import os

    out = []
    for name in cfg.training.report_to:
        if importlib.util.find_spec(name) is None:
            out.append(("training.report_to", f"{name} is selected but not installed: pip install {name} "
                        "(or `make setup`, which installs the trackers), or untick it"))
        elif name == "wandb" and os.environ.get("WANDB_MODE", "").lower() not in _WANDB_OFFLINE and not _wandb_logged_in():
            out.append(("training.report_to", "wandb logs online but this machine has no W&B login: set WANDB_API_KEY "
                        "(or run `wandb login`), or set WANDB_MODE=offline to keep the run in the run directory"))
    return out


def _lora_variant_problems(cfg: RunConfig) -> list[Problem]:
    m, q, out = cfg.method, cfg.model.quantization, []
    lora = m.finetuning_type in ("lora", "qlora")
    if m.use_dora and q != "none" and _peft_version() < DORA_QUANTIZED_PEFT:
        out.append(("method.use_dora", f"DoRA on {q}-quantized weights needs peft >= "
                    f"{'.'.join(map(str, DORA_QUANTIZED_PEFT))} (installed: {'.'.join(map(str, _peft_version()))}): "
                    "upgrade peft, or train DoRA without quantization"))
    if m.init_lora_weights == "pissa" and q != "none":
        out.append(("method.init_lora_weights", "PiSSA starts from an SVD of the full-precision weights, which cannot "
                    "be taken of quantized weights: use init_lora_weights olora or default with QLoRA, or quantization none"))
    if m.init_lora_weights in ("pissa", "olora") and m.stage in ("dpo", "kto", "rl") and lora:
        out.append(("method.init_lora_weights", f"{m.init_lora_weights} moves part of each base weight into the "
                    f"adapter, and {m.stage} uses the base as its reference model: use init_lora_weights default or gaussian"))
    if m.loraplus_lr_ratio > 0 and not lora:
        out.append(("method.loraplus_lr_ratio", "LoRA+ sets the learning rates of LoRA adapters: use finetuning_type "
                    "lora or qlora, or loraplus_lr_ratio 0"))
    if cfg.model.rope_scaling != "none" and cfg.model.rope_factor < 1:
        out.append(("model.rope_factor", f"a rope factor of {cfg.model.rope_factor} would shrink the context: use 1 or more"))
    return out


def _mix_problems(cfg: RunConfig) -> list[Problem]:
    d = cfg.data
    p = d.mix_probabilities
    if not p:
        return []
    if d.mix != "interleave":
        return [("data.mix_probabilities", "probabilities only apply to data.mix interleave: set mix interleave, or "
                 "leave the probabilities empty")]
    if len(p) != len(d.datasets):
        return [("data.mix_probabilities", f"{len(p)} probabilities for {len(d.datasets)} datasets: give one per dataset")]
    if any(x < 0 for x in p):
        return [("data.mix_probabilities", "a probability cannot be negative: each is the share of rows drawn from its dataset")]
    if abs(sum(p) - 1) > 1e-6:
        return [("data.mix_probabilities", f"the probabilities {', '.join(f'{x:g}' for x in p)} sum to {sum(p):g}, "
                 "not 1: each is the share of rows drawn from its dataset")]
    return []


def _data_problems(cfg: RunConfig) -> list[Problem]:
    from engine.data.errors import DataError
    from engine.data.registry import resolve_dataset

    if not cfg.data.datasets:
        return [("data.datasets", "choose at least one dataset")]
    need = STAGE_KINDS[cfg.method.stage]
    out = []
    for i, name in enumerate(cfg.data.datasets):
        try:
            spec = resolve_dataset(name, cfg.data.registry)
        except DataError as err:
            out.append((f"data.datasets[{i}]", str(err)))
            continue
        if spec.kind != need:
            out.append((f"data.datasets[{i}]", f"dataset '{name}' is {spec.kind} data, but stage {cfg.method.stage} needs {need} data"))
            continue
        problem = _records_problem(spec, cfg.data.max_samples)
        if problem:
            out.append((f"data.datasets[{i}]", problem))
    return out


def _records_problem(spec, limit: int | None) -> str | None:
    """The first record of the dataset that cannot become an example (file and line named), or a dataset with none."""
    from engine.data.errors import DataError
    from engine.data.formats import iter_examples

    count = 0
    try:
        for count, _ in enumerate(iter_examples(spec.path, spec.format, spec.columns, limit), 1):
            pass
    except DataError as err:
        return f"dataset '{spec.name}': {err}"
    except OSError as err:
        return f"dataset '{spec.name}' cannot be read: {err}"
    return None if count else f"dataset '{spec.name}' ({spec.path}) has no usable record"


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
    else:
        from engine.run.nodes import check_problems

        out += check_problems(cfg)
    return out


def _resume_problems(cfg: RunConfig, run_dir: Path | None) -> list[Problem]:
    """A resume needs a complete checkpoint, and a completed run resumes only when its steps or epochs were raised."""
    import json

    from engine.run import rundir

    r, field, t = cfg.training.resume_from, "training.resume_from", cfg.training
    if not r:
        return []
    if r == "latest":
        ckpt = rundir.resumable_checkpoint(run_dir) if run_dir else None
        if ckpt is None:
            broken = rundir.incomplete_checkpoints(run_dir) if run_dir else []
            return [(field, f"'latest' needs an existing run with a complete checkpoint, and {run_dir or 'output.run_dir'} "
                     "has none" + (f" ({', '.join(p.name for p in broken)}: incomplete saves, delete them)" if broken else ""))]
    else:
        ckpt = Path(r)
        if not (ckpt / rundir.TRAINER_STATE).is_file():
            return [(field, f"{r} is not a checkpoint directory (no trainer_state.json: not a checkpoint, or a save cut short)")]
    try:
        state = json.loads((ckpt / rundir.TRAINER_STATE).read_text(encoding="utf-8"))
        step, epoch = int(state.get("global_step", 0)), float(state.get("epoch") or 0.0)
    except (OSError, ValueError, TypeError) as err:
        return [(field, f"{ckpt / rundir.TRAINER_STATE} is unreadable ({err})")]
    from engine.run.nodes import resume_problems

    world = resume_problems(ckpt, cfg.distributed)  # a ZeRO checkpoint resumes only with its own world size
    if world:
        return world
    done_step, done_epoch = step, epoch
    latest = rundir.resumable_checkpoint(ckpt.parent)
    if (ckpt.parent / rundir.FINAL).is_dir() and latest is not None:  # a completed run: its end counts, not ckpt's
        try:
            last = json.loads((latest / rundir.TRAINER_STATE).read_text(encoding="utf-8"))
            done_step, done_epoch = max(step, int(last.get("global_step", 0))), max(epoch, float(last.get("epoch") or 0.0))
        except (OSError, ValueError, TypeError):
            pass
    if t.max_steps > 0 and t.max_steps <= done_step:
        return [(field, f"the run already trained {done_step} steps (training.max_steps is {t.max_steps}): raise "
                 "training.max_steps to train further, or start a new run")]
    if t.max_steps <= 0 and t.num_train_epochs <= done_epoch + 1e-6:
        return [(field, f"the run already trained {done_epoch:g} epochs (training.num_train_epochs is "
                 f"{t.num_train_epochs:g}): raise training.num_train_epochs to train further, or start a new run")]
    return []


def _run_dir_problems(run_dir: Path | None) -> list[Problem]:
    """A run directory the file system cannot hold: a name over its length limit, or no right to create it."""
    import os

    if run_dir is None:
        return []
    field = "output.run_dir"
    long = [part for part in run_dir.parts if len(part.encode()) > 255]
    if long:
        return [(field, f"the name '{long[0][:40]}...' is {len(long[0].encode())} bytes long; a file system allows "
                 "at most 255 per name")]
    if len(str(run_dir).encode()) >= 4096:
        return [(field, f"the path is {len(str(run_dir).encode())} bytes long; at most 4095 are allowed")]
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [(field, f"{existing} is a file, so {run_dir} cannot be created")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [(field, f"{existing} is not writable, so the run cannot write {run_dir}")]
    return []


def warnings(cfg: RunConfig) -> list[Problem]:
    """Settings that run but that the user likely does not want here, as (field, message); the run still starts."""
    from engine.run.hardware import slow_bf16_on_cpu

    out = []
    bf16 = [f for f, on in (("training.precision", cfg.training.precision == "bf16"),
                            ("model.dtype", cfg.model.dtype == "bfloat16")) if on]
    if bf16 and slow_bf16_on_cpu():
        out += [(f, "bf16 on this CPU is about 25x slower than fp32: it has no bf16 matrix units (no avx512_bf16 or "
                    "amx_bf16 in /proc/cpuinfo), so every bf16 matmul is emulated; use "
                    f"{'auto or fp32' if f == 'training.precision' else 'auto or float32'} here") for f in bf16]
    rope = rope_warning(cfg)
    return out + ([("data.cutoff_len", rope)] if rope else [])


def check(cfg: RunConfig, run_dir: str | Path | None = None) -> list[Problem]:
    """Every problem with ``cfg`` as (field, message); empty when the run can start."""
    run_dir = Path(run_dir) if run_dir else (Path(cfg.output.run_dir) if cfg.output.run_dir else None)
    problems = _model_problems(cfg) + _method_problems(cfg) + stage_problems(cfg) + _template_problems(cfg)
    problems += _model_shape_problems(cfg) + _vocab_problems(cfg) + _lora_variant_problems(cfg)
    problems += _tracker_problems(cfg) + _mix_problems(cfg)
    where = _run_dir_problems(run_dir)
    problems += _data_problems(cfg) + _distributed_problems(cfg, run_dir) + (where or _resume_problems(cfg, run_dir))
    return problems
