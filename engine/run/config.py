"""The run config: the one contract between the web UI, the CLI and the engine.

Every field has a type, a default and a one-line description. The web UI builds its
form from these fields (bounds, defaults and help come from here), the CLI loads the
same model from YAML, and the engine reads it back from ``<run_dir>/config.yaml``.

This module imports no torch, so the UI and the checks stay light.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.run.stages import ROWS, STAGE_NAMES

# The project's own defaults are absolute, so the CLI and the UI find them from any folder; every other relative
# path resolves against the current directory (README, "Paths").
PROJECT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = str(PROJECT / "models" / "SmolLM2-135M-Instruct")  # `workbench prepare-model` writes it
DEFAULT_REGISTRY = str(PROJECT / "data" / "dataset_info.yaml")  # the project's dataset registry


Stage = Literal[STAGE_NAMES]  # the rows of the stage table (engine/run/stages.py)
FinetuningType = Literal["full", "freeze", "lora", "qlora"]
Quantization = Literal["none", "nf4", "fp4", "int8"]
# TRL 1.16 DPOConfig.loss_type values that need no further parameter ("sft" is sft_weight; exo_pair and robust need label smoothing)
Tracker = Literal["tensorboard", "wandb", "mlflow"]
DpoLoss = Literal["sigmoid", "ipo", "hinge", "bco_pair", "nca_pair", "sppo_hard", "aot", "aot_unpaired",
                  "apo_zero", "apo_down", "discopop", "sigmoid_norm"]


class Section(BaseModel):
    """The base of every config schema (run, eval, export): unknown fields are refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str = Field(DEFAULT_MODEL, json_schema_extra={"path": "path"}, description="Local Hugging Face model directory (config.json + weights + tokenizer).")
    template: str = Field("auto", description="Chat template: 'auto' uses the tokenizer's own chat template, or a registry name such as chatml, llama3, alpaca.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Dtype the weights are loaded in; 'auto' = bfloat16 on GPUs that support it (else float16); on a CPU float32, or bfloat16 for a LoRA/QLoRA base when the run computes in bf16.")
    quantization: Quantization = Field("none", description="Load the base weights quantized with bitsandbytes: 4-bit NF4 or FP4, or 8-bit. QLoRA needs nf4/fp4/int8.")
    double_quant: bool = Field(True, description="4-bit only: also quantize the quantization constants (saves ~0.4 bit per weight).")
    trust_remote_code: bool = Field(False, description="Allow the model directory to run its own Python code. Off unless you trust the files.")
    rope_scaling: Literal["none", "linear", "dynamic", "yarn"] = Field("none", description="Stretch the rotary position embedding to train beyond the model's context length (max_position_embeddings): linear, dynamic (NTK) or yarn, by rope_factor.")
    rope_factor: float = Field(2.0, gt=0.0, le=64.0, description="rope_scaling only: how many times the model's context length the positions are stretched to (at least 1).")
    extend_vocab: str = Field("", json_schema_extra={"path": "path"}, description="Add tokens to the vocabulary: a text file with one token per line, or a tokenizer (directory, tokenizer.json or SentencePiece .model) whose vocabulary is merged in; embed_tokens and lm_head then train too.")


class MethodConfig(Section):
    stage: Stage = Field("sft", description="Training stage: " + ", ".join(f"{r.name} ({r.description})" for r in ROWS) + ".")
    finetuning_type: FinetuningType = Field("lora", description="full: all weights; freeze: only the last N layers; lora: low-rank adapters; qlora: adapters on a quantized base.")
    freeze_trainable_layers: int = Field(2, ge=1, le=1024, description="freeze only: how many of the last decoder layers are trained.")
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    lora_alpha: int = Field(16, ge=1, le=4096, description="LoRA alpha; the update is scaled by alpha / rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target: str = Field("all-linear", description="Modules that get adapters: 'all-linear' or a comma-separated list such as q_proj,v_proj.")
    modules_to_save: str = Field("", description="Comma-separated modules trained fully next to the adapters, e.g. embed_tokens,lm_head.")
    use_dora: bool = Field(False, description="DoRA: split each adapted weight into magnitude and direction and train both (often better than LoRA at the same rank, slower).")
    use_rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank, which keeps high ranks stable.")
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora"] = Field("default", description="How the adapters start: default (PEFT's: B = 0, A Kaiming-uniform), gaussian, pissa (principal singular vectors of the weight) or olora (QR of the weight).")
    loraplus_lr_ratio: float = Field(0.0, ge=0.0, le=1000.0, description="LoRA+: the learning rate of the B matrices is this many times that of A (about 16 is usual; 0: off).")
    # Fields of some stages only: the stage table (engine/run/stages.py) names the stages that read each.
    beta: float = Field(0.1, gt=0.0, le=100.0, description="dpo, kto: β, how far the model may move from the reference (higher: closer); orpo: λ, the weight of the odds-ratio term.")
    dpo_loss: DpoLoss = Field("sigmoid", description="dpo: preference loss: sigmoid (DPO), ipo, hinge (SLiC), bco_pair, nca_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm.")
    sft_weight: float = Field(0.0, ge=0.0, le=100.0, description="dpo: weight of an SFT loss on the chosen answers added to the preference loss (0: none).")
    desirable_weight: float = Field(1.0, gt=0.0, le=100.0, description="kto: weight of the loss on desirable (label true) answers; raise it when they are the rarer kind.")
    undesirable_weight: float = Field(1.0, gt=0.0, le=100.0, description="kto: weight of the loss on undesirable (label false) answers; raise it when they are the rarer kind.")
    reward_model: str = Field("", json_schema_extra={"path": "path"}, description="rl: the reward model, the final/ or checkpoint-N directory of an rm run.")
    num_generations: int = Field(4, ge=2, le=256, description="rl: completions sampled per prompt and compared with each other; batch size × accumulation × processes must be a multiple of it.")
    max_new_tokens: int = Field(64, ge=1, le=32_768, description="rl: most tokens generated per completion; prompts longer than cutoff_len minus this are skipped.")
    kl_beta: float = Field(0.04, ge=0.0, le=100.0, description="rl: weight of the KL penalty that keeps the policy near the starting model (0: no penalty, no KL logged).")


class DataConfig(Section):
    datasets: list[str] = Field(default_factory=lambda: ["identity"], json_schema_extra={"path": "dataset"}, description="Registered dataset names or paths to data files (json, jsonl, csv, parquet, txt).")
    registry: str = Field(DEFAULT_REGISTRY, json_schema_extra={"path": "path"}, description="Dataset registry file that maps names to files, formats and columns.")
    cutoff_len: int = Field(1024, ge=8, le=1_048_576, description="Maximum tokens per example; longer examples are truncated.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many samples from each dataset (None: all).")
    val_size: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of samples held out for evaluation (0: no validation).")
    multiturn_loss: Literal["all", "last", "split"] = Field("all", description="Multi-turn loss: every assistant turn, only the last one, or each turn as its own example.")
    mix: Literal["concat", "interleave"] = Field("concat", description="Several datasets: concat (one after another, every row once) or interleave (rows drawn from each dataset by mix_probabilities).")
    mix_probabilities: list[float] = Field(default_factory=list, description="interleave only: the share of rows drawn from each dataset, in the order of datasets, summing to 1 (empty: take turns).")
    mix_stopping: Literal["first_exhausted", "all_exhausted"] = Field("first_exhausted", description="interleave only: stop when the first dataset runs out, or when every one has (smaller ones are then repeated).")


class TrainingConfig(Section):
    num_train_epochs: float = Field(3.0, gt=0, le=10_000, description="Passes over the data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1 uses num_train_epochs.")
    per_device_train_batch_size: int = Field(2, ge=1, le=4096, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(4, ge=1, le=4096, description="Forward passes per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt", "cosine_with_restarts"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip gradients to this norm (0: no clipping).")
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"] = Field("adamw_torch", description="Optimizer; paged AdamW saves memory spikes with QLoRA on GPUs.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="Compute precision: auto = bf16 autocast where the hardware supports it, else fp32.")
    neftune_noise_alpha: float = Field(0.0, ge=0.0, le=100.0, description="NEFTune: add uniform noise of this scale to the input embeddings while training (5 is usual; 0: off).")
    report_to: list[Tracker] = Field(default_factory=list, description="Experiment trackers that also receive the metrics and the run config: tensorboard (logs in the run directory), wandb, mlflow (empty: none).")
    batch_by: Literal["examples", "tokens"] = Field("examples", description="sft, pt: what fills a batch: examples (per_device_train_batch_size of them, whatever their length) or tokens (examples packed up to cutoff_len × per_device_train_batch_size tokens, never more: the same peak memory every step, each example once per epoch).")
    gradient_checkpointing: Literal["auto", "off", "on"] = Field("auto", description="Recompute activations in the backward pass (less memory, slower): on (every layer), off, or auto (sft, pt; other stages: off): every k-th layer, the fewest that keep the largest batch within memory_gb.")
    memory_gb: float = Field(0.0, ge=0.0, le=100_000.0, description="The memory one training process may take, in GB (RSS on a CPU, allocated memory on a GPU: weights, optimizer state, activations); gradient_checkpointing auto plans for it (0: the activations may take half the memory free when training starts).")

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_switch(cls, value):
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value  # configs of before auto
    seed: int = Field(42, description="Random seed for data order, dropout and initialisation.")
    logging_steps: int = Field(1, ge=1, description="Write a metrics row every N optimizer steps.")
    save_steps: int = Field(100, ge=1, description="Save a checkpoint every N optimizer steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate on the validation split every N steps (None: every save).")
    save_total_limit: int | None = Field(None, ge=1, description="Keep at most this many checkpoints (None: keep all).")
    resume_from: str | None = Field(None, json_schema_extra={"path": "checkpoint"}, description="Checkpoint to resume from: a checkpoint directory, or 'latest' for the run's newest one.")


class Node(Section):
    host: str = Field(description="Host name as ssh reaches it (a name in ~/.ssh/config works).")
    slots: int = Field(1, ge=1, le=1024, description="Ranks this node can run: its GPUs, or processes on a CPU node.")


class DistributedConfig(Section):
    devices: str = Field("", description="GPU ids to use, e.g. '0,1'; empty uses every visible GPU (or the CPU when there is none).")
    num_processes: int = Field(1, ge=1, le=1024, description="Processes (ranks) on this machine; on GPUs one per device.")
    zero_stage: Literal[0, 2, 3] = Field(0, description="DeepSpeed ZeRO stage: 0 off, 2 shards optimizer state and gradients, 3 also shards weights.")
    offload: bool = Field(False, description="ZeRO 2/3: keep optimizer state (and ZeRO-3 weights) in CPU memory.")
    hostfile: str | None = Field(None, json_schema_extra={"path": "path"}, description="DeepSpeed hostfile for training across several machines: one 'HOST slots=N' line per node, # comments.")
    nodes: list[Node] = Field(default_factory=list, description="The machines as a table instead of a hostfile: each node's host (as ssh reaches it) and slots (its GPUs, or ranks on a CPU node); the first node hosts rank 0.")
    include: str = Field("", description="Several machines: the slots of each node to use, in DeepSpeed's --include syntax, e.g. node-a:0,1@node-b:0; empty uses every slot.")
    launcher: Literal["pdsh", "no_ssh"] = Field("pdsh", description="Several machines: pdsh starts every node's ranks over ssh from here; no_ssh: each node runs `workbench train CONFIG --node-rank N` itself (Slurm).")
    master_addr: str = Field("", description="Several machines: the address every node reaches the first node at; empty uses the first node's name.")
    master_port: int | None = Field(None, ge=1024, le=65535, description="Rendezvous port; None picks a free one.")
    timeout: int = Field(600, ge=10, le=86_400, description="Seconds a rank waits for the others in a collective; a rank lost on another node fails the run after at most this.")

    @property
    def device_ids(self) -> list[int]:
        """The ids in ``devices`` (what is not an id is check()'s to name)."""
        return [int(i) for i in re.findall(r"\d+", self.devices)]


class OutputConfig(Section):
    run_dir: str = Field("", json_schema_extra={"path": "path"}, description="Run directory; empty creates workspace/runs/<time>-<stage>.")


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` lists (field, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__("; ".join(f"{where}{field}: {msg}" if field else f"{where}{msg}" for field, msg in problems))


def read_project_yaml(path: str | Path) -> Any:
    """A YAML file shipped with the project (form layout, locales, templates), read with libyaml's C loader where
    PyYAML has it: ten times faster, which the web UI's start-up feels. Users' files keep ``yaml.safe_load``, whose
    error wording the messages quote."""
    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = prefix + (str(key.value),)
                lines[path] = key.start_mark.line + 1
                walk(value, path)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _problems(err: ValidationError, lines: dict[tuple[str, ...], int] | None = None) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        field = ".".join(loc)
        msg = "unknown field (not part of the run config)" if e["type"] == "extra_forbidden" else e["msg"]
        line = None
        if lines:
            for n in range(len(loc), 0, -1):
                if loc[:n] in lines:
                    line = lines[loc[:n]]
                    break
        out.append((f"{field} (line {line})" if line else field, msg))
    return out


def parse_config(data: dict[str, Any], source: str | None = None, text: str | None = None, schema: type[BaseModel] | None = None):
    """Validate a config dict against ``schema`` (default RunConfig; the eval and export jobs pass their own)."""
    try:
        return (schema or RunConfig).model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_problems(err, _yaml_lines(text) if text else None), source) from None


def apply_overrides(data: dict[str, Any], overrides: list[str], schema: type[BaseModel] | None = None) -> dict[str, Any]:
    """Apply ``section.field=value`` strings (values parsed as YAML) to a config dict."""
    sections = (schema or RunConfig).model_fields
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append((item, "overrides look like section.field=value, e.g. training.max_steps=30"))
            continue
        section, field = parts
        if section not in sections:
            problems.append((key, f"unknown section '{section}' (one of {', '.join(sections)})"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][field] = value
    if problems:
        raise ConfigError(problems, "command line")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None, schema: type[BaseModel] | None = None):
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("", f"config file not found: {path}")])
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([("", f"invalid YAML{where}: {getattr(err, 'problem', err)}")], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([("", "the file must hold a mapping of sections (model, method, data, ...)")], str(path))
    if overrides:
        data = apply_overrides(data, overrides, schema)
    return parse_config(data, str(path), text, schema)


def dump_config(cfg: BaseModel, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def field_info(section: str, name: str):
    """The pydantic FieldInfo of ``section.name`` (used by the UI to build widgets)."""
    return RunConfig.model_fields[section].annotation.model_fields[name]
