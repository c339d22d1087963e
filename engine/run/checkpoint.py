"""The one checkpoint resolver: what a directory holds, which base it needs, and loading it for evaluation or export.

A checkpoint is an adapter directory (adapter_config.json + adapter_model.safetensors, from a LoRA
or QLoRA run) or a full model directory (config.json + weights). ``resolve`` describes one (adapter
or full weights, its base model, tokenizer and template, reward model or not, stage, step) for chat,
the API, eval and export; ``workspace_checkpoints`` and ``weights_dirs`` are every checkpoint list of
the UI. The base of an adapter comes from the run's config.yaml next to it (model.path), else
adapter_config.json. The resolver imports no torch. ``check_adapter_base``
compares every adapter matrix with the shape of the base module it attaches to, so a mismatched
base is reported before any weights load.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.run import rundir

ADAPTER_CONFIG = "adapter_config.json"

class CheckpointError(ValueError):
    """A checkpoint or base model that cannot be used; ``field`` names the config field."""

    def __init__(self, message: str, field: str = ""):
        self.field = field
        super().__init__(message)


@dataclass
class Checkpoint:
    """What a weights directory holds: everything chat, the API, eval, export and the UI lists need to know."""

    path: Path
    kind: str                 # "adapter" or "full"
    base: Path | None         # base model directory (adapters)
    quantization: str = "none"
    run_config: dict | None = None
    tokenizer_dir: Path | None = None   # where its tokenizer (and saved chat template) lives
    template: str | None = None         # the chat template it was trained with (its run's model.template)
    stage: str | None = None            # its run's method.stage
    step: int | None = None             # N of checkpoint-N (None for final/ and plain models)
    reward_model: bool = False

    @property
    def label(self) -> str:
        parent = self.path.parent.name
        return f"{parent}/{self.path.name}" if parent else self.path.name


def run_config_of(path: Path) -> tuple[dict | None, Path | None]:
    """The run config saved with a checkpoint (in it, or in its run directory) and its file: the one reader of it."""
    for candidate in (path / rundir.CONFIG, path.parent / rundir.CONFIG):
        if candidate.is_file():
            try:
                data = yaml.safe_load(candidate.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue
            if isinstance(data, dict) and isinstance(data.get("model"), dict):
                return data, candidate
    return None, None


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")))


def safetensors_params(path: Path) -> tuple[int, int] | None:
    """(all parameters, embedding parameters) of a model directory from its safetensors headers (a few KB read per
    shard, no weights), or None without safetensors."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    total = embed = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100_000_000:
                    return None
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for name, meta in header.items():
            if name == "__metadata__" or not isinstance(meta, dict):
                continue
            count = math.prod(meta.get("shape") or [1])
            total += count
            if "embed" in name or "wte" in name or "lm_head" in name:
                embed += count
    return total, embed


def is_run_dir(path: Path) -> bool:
    """A run directory (config.yaml, no weights of its own) rather than a checkpoint or model."""
    return (path / rundir.CONFIG).is_file() and not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file()


def weights_dirs(run_dir: Path) -> list[tuple[int | None, Path]]:
    """(step, path) of a run's weights: final/ first (step None), then checkpoint-N/, newest first."""
    final = [(None, run_dir / rundir.FINAL)] if (run_dir / rundir.FINAL).is_dir() else []
    return final + list(reversed(rundir.checkpoints(run_dir)))


def pick_in_run(run_dir: Path) -> Path | None:
    """The weights a run directory stands for: final/ when it exists, else its newest checkpoint."""
    found = weights_dirs(run_dir)
    return found[0][1] if found else None


def is_reward_model(path: str | Path) -> bool:
    """A checkpoint of an rm run, or a model or adapter with a sequence-classification score head."""
    path = Path(path)
    run_cfg, _ = run_config_of(path)
    if run_cfg is not None:
        return (run_cfg.get("method") or {}).get("stage") == "rm"
    meta = path / (ADAPTER_CONFIG if (path / ADAPTER_CONFIG).is_file() else "config.json")
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data.get("task_type") == "SEQ_CLS" or any(a.endswith("ForSequenceClassification")
                                                     for a in data.get("architectures") or [])


def reward_model_refusal(path: str | Path) -> str:
    return (f"{path} is a reward model (a checkpoint of an rm run): it scores replies instead of writing them, so it "
            "cannot be chatted with, evaluated or exported as a language model; use it as method.reward_model of an rl run")


def declared_base(path: Path, run_cfg: dict | None = None) -> Path | None:
    """The base an adapter was trained on: its run's model.path, else adapter_config.json's base_model_name_or_path."""
    if run_cfg is None:
        run_cfg, _ = run_config_of(path)
    name = (run_cfg or {}).get("model", {}).get("path")
    if not name:
        try:
            name = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError):
            name = None
    return Path(name).expanduser().resolve() if name else None


def resolve(path: str | Path, base: str | Path | None = None, field: str = "model.checkpoint",
            generative: bool = True, run_means_latest: bool = False) -> Checkpoint:
    """Describe a checkpoint, a merged export or a plain model directory: the one resolver.

    Raises CheckpointError for a missing or unusable directory, for a reward model where a language model is
    needed (``generative``), and for an adapter whose base is not on this machine. A run directory stands for
    its final/ or newest checkpoint with ``run_means_latest`` (chat, API); otherwise it is refused."""
    path = Path(path).expanduser().resolve()
    if not str(path) or not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}", field)
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; choose a checkpoint directory (checkpoint-N or final)", field)
    if run_means_latest and is_run_dir(path):
        picked = pick_in_run(path)
        if picked is None:
            raise CheckpointError(f"run {path.name} has no checkpoint or final weights yet", field)
        path = picked
    reward = is_reward_model(path)
    if generative and reward:
        raise CheckpointError(reward_model_refusal(path), field)
    run_cfg, _ = run_config_of(path)
    model = (run_cfg or {}).get("model", {})
    step = rundir._CKPT.match(path.name)
    facts = dict(run_config=run_cfg, template=model.get("template"), stage=(run_cfg or {}).get("method", {}).get("stage"),
                 step=int(step.group(1)) if step else None, reward_model=reward,
                 tokenizer_dir=path if (path / "tokenizer_config.json").is_file() else None)
    if (path / ADAPTER_CONFIG).is_file():
        if not (path / "adapter_model.safetensors").is_file() and not (path / "adapter_model.bin").is_file():
            raise CheckpointError(f"{path} has adapter_config.json but no adapter_model.safetensors (an unfinished save?)", field)
        base_path = Path(base).expanduser().resolve() if base else declared_base(path, run_cfg)
        if base_path is None or not is_model_dir(base_path):
            raise CheckpointError(f"base model of {path.name} not found at {base_path}; set the base model directory explicitly",
                                  "model.base")
        return Checkpoint(path, "adapter", base_path, model.get("quantization", "none") or "none", **facts)
    if is_model_dir(path):
        facts["tokenizer_dir"] = facts["tokenizer_dir"] or path
        return Checkpoint(path, "full", None, "none", **facts)
    if path.name != rundir.FINAL and (rundir.latest_checkpoint(path) or (path / rundir.FINAL).is_dir()):
        raise CheckpointError(f"{path} is a run directory; choose one of its checkpoints (final or checkpoint-N)", field)
    raise CheckpointError(f"{path} holds neither an adapter (adapter_config.json) nor model weights (config.json + *.safetensors)", field)


def origin_of(ckpt: Checkpoint) -> Path | None:
    """The model a checkpoint was tuned from (what "its base" means side by side): an adapter's base, a full or
    freeze checkpoint's run model.path, an export's model card ``base_model``; None for a plain model.
    Raises CheckpointError when the named model is not a model directory on this machine."""
    if ckpt.kind == "adapter":
        return ckpt.base
    name, where = ((ckpt.run_config or {}).get("model") or {}).get("path"), "its run's model.path"
    if not name and (ckpt.path / "README.md").is_file():
        from huggingface_hub.repocard import metadata_load

        try:
            name, where = (metadata_load(ckpt.path / "README.md") or {}).get("base_model"), "its model card's base_model"
        except (ValueError, yaml.YAMLError):
            name = None
    if not isinstance(name, str) or not name:
        return None
    origin = Path(name).expanduser().resolve()
    if origin == ckpt.path:
        return None
    if not is_model_dir(origin):
        raise CheckpointError(f"the base of {ckpt.path} ({where}) is {name}, which is not a model directory on this "
                              "machine; pick the model to compare with yourself", "model.base")
    return origin


def workspace_checkpoints(workspace: Path, reward: bool = False) -> list[tuple[str, str]]:
    """(label, path) of the final/ and checkpoint-N/ of the workspace's language-model runs (or, with ``reward``,
    of its rm runs), newest run first: every checkpoint list of the UI."""
    out = []
    for run in rundir.list_runs(workspace):
        if is_reward_model(run) == reward:
            out += [(f"{run.name}/{d.name}", str(d)) for _, d in weights_dirs(run)]
    return out


def _adapter_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def check_adapter_base(ckpt: Checkpoint, trust_remote_code: bool = False) -> None:
    """Raise CheckpointError when the adapter's matrices do not fit the base model's modules."""
    if ckpt.kind != "adapter" or not (ckpt.path / "adapter_model.safetensors").is_file():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt.base, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    modules = dict(model.named_modules())
    problems = []
    for key, shape in _adapter_shapes(ckpt.path).items():
        name = key.removeprefix("base_model.model.")
        for part in (".lora_A.weight", ".lora_B.weight"):
            if name.endswith(part):
                module = modules.get(name[: -len(part)])
                if module is None:
                    problems.append(f"{name[: -len(part)]} does not exist in the base")
                elif part == ".lora_A.weight" and getattr(module, "in_features", shape[1]) != shape[1]:
                    problems.append(f"{name}: input size {shape[1]} vs base {module.in_features}")
                elif part == ".lora_B.weight" and getattr(module, "out_features", shape[0]) != shape[0]:
                    problems.append(f"{name}: output size {shape[0]} vs base {module.out_features}")
        if len(problems) >= 3:
            break
    if problems:
        raise CheckpointError(f"the adapter {ckpt.path} does not match the base model {ckpt.base} "
                              f"({config.model_type}, hidden size {getattr(config, 'hidden_size', '?')}): "
                              + "; ".join(problems), "model.base")


def fit_base(model, tokenizer):
    """Grow a base model's embeddings to the tokenizer saved with a vocabulary-extended checkpoint, so its
    adapter (whose trained embed_tokens/lm_head have the new size) fits; a no-op for any other checkpoint.
    Every loader calls this between loading the base and attaching an adapter."""
    from engine.train.vocab import resize_embeddings

    resize_embeddings(model, len(tokenizer))
    return model


def load_for_eval(ckpt: Checkpoint | None, base: Path, dtype, trust_remote_code: bool = False, tokenizer=None):
    """The model of a checkpoint (adapter on its 16/32-bit base, or full weights), or the base when ckpt is None.

    ``tokenizer``: the checkpoint's own (read from the checkpoint when not given), to fit the base's vocabulary.
    """
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if ckpt is None:
        return AutoModelForCausalLM.from_pretrained(base, **kw).eval()
    if ckpt.kind == "full":
        return AutoModelForCausalLM.from_pretrained(ckpt.path, **kw).eval()
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(ckpt.base, **kw)
    if tokenizer is None and (ckpt.path / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer_for(ckpt.path, trust_remote_code)
    if tokenizer is not None:
        fit_base(model, tokenizer)
    return PeftModel.from_pretrained(model, str(ckpt.path)).eval()


def load_tokenizer_for(path: Path, trust_remote_code: bool = False):
    """The tokenizer saved with a checkpoint (its chat template travels with it), padded on the left."""
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer_config.json").is_file():
        raise CheckpointError(f"{path} has no tokenizer (tokenizer_config.json)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


# ---------------------------------------------------------------- resuming on another world size (DeepSpeed universal)

UNIVERSAL_LATEST = "latest_universal"  # DeepSpeed's pointer to the universal folder (as ``latest`` to global_stepN)


def zero_shards(ckpt: Path) -> tuple[str, int] | None:
    """(``global_stepN``, ranks that saved it) of a ZeRO checkpoint (one optimizer shard per rank), else None."""
    shards = sorted(Path(ckpt).glob("global_step*/*zero_pp_rank_*_optim_states.pt"))
    if not shards:
        return None
    ranks = {p.name.split("zero_pp_rank_")[1].split("_")[0] for p in shards}
    return shards[0].parent.name, len(ranks)


def needs_universal(ckpt: Path, world_size: int) -> bool:
    """Whether resuming ``ckpt`` with ``world_size`` ranks needs DeepSpeed's universal format (its ZeRO shards were
    written by another number of ranks)."""
    zero = zero_shards(ckpt)
    return zero is not None and zero[1] != world_size


def universal_dir(ckpt: Path) -> Path | None:
    """The universal folder made of ``ckpt`` (``global_stepN_universal`` beside ``global_stepN``), once complete."""
    zero = zero_shards(ckpt)
    if zero is None:
        return None
    path = Path(ckpt) / f"{zero[0]}_universal"
    pointer = Path(ckpt) / UNIVERSAL_LATEST
    done = path.is_dir() and pointer.is_file() and pointer.read_text(encoding="utf-8").strip() == path.name
    return path if done else None


def make_universal(ckpt: Path, python: str, log=None) -> Path:
    """Convert the ZeRO shards of ``ckpt`` to DeepSpeed's universal format with ``deepspeed.checkpoint.ds_to_universal``
    (the shards and every other file stay as they are). Written under a temporary name and renamed, the pointer
    ``latest_universal`` last, so a conversion cut short is redone. Returns the folder; CheckpointError when
    DeepSpeed cannot convert it (its last line)."""
    import shutil
    import subprocess

    ckpt = Path(ckpt)
    done = universal_dir(ckpt)
    if done is not None:
        return done
    tag, _ = zero_shards(ckpt)
    out, tmp = ckpt / f"{tag}_universal", ckpt / f"tmp-{tag}_universal"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [python, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag), "--output_folder",
           str(tmp), "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (ckpt / UNIVERSAL_LATEST).unlink(missing_ok=True)
        last = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()][-1:] or ["see train.log"]
        raise CheckpointError(f"DeepSpeed could not convert {ckpt.name} to a universal checkpoint: {last[0]}",
                              "training.resume_from")
    tmp.rename(out)
    rundir.atomic_write(ckpt / UNIVERSAL_LATEST, out.name)
    return out
