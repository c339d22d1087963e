"""Typed configs of the evaluation and export jobs (one schema each), loaded like the run config.

For every job kind ``output.job_dir`` (a run's ``output.run_dir``) is the job's own directory and
``output.dir`` is where its product goes (eval: the predictions; export: the merged model).

``workbench eval CONFIG`` / ``workbench export CONFIG`` and the web UI's tabs both build these;
the job process reads them back from ``<job_dir>/config.yaml``. Imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.run.config import load_config

JobKind = Literal["eval", "export"]
GGUFType = Literal["f16", "q8_0", "q4_0"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- evaluation

class EvalModels(_Section):
    base: str = Field("", description="Base model directory; empty reads it from the first checkpoint's run config (model.path).")
    checkpoints: list[str] = Field(default_factory=list, description="Checkpoints to evaluate (adapter or full-weight directories: checkpoint-N, final, or an export).")
    include_base: bool = Field(True, description="Also evaluate the base model, as the first row of the comparison.")
    template: str = Field("auto", description="Chat template: 'auto' uses each checkpoint's saved chat template, or a registry name.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype the weights are evaluated in (QLoRA bases are loaded unquantized).")
    trust_remote_code: bool = Field(False, description="Allow the model directory to run its own Python code.")


class EvalTasks(_Section):
    loss: bool = Field(True, description="Loss and perplexity on the answers of the dataset (prompt tokens masked, as in training).")
    generation: bool = Field(True, description="Generate answers for the dataset's prompts and score them with BLEU-4 and ROUGE-1/2/L.")
    choice: bool = Field(False, description="Multiple-choice benchmark accuracy (benchmark.file), scored by the log-likelihood of each choice.")


class EvalData(_Section):
    datasets: list[str] = Field(default_factory=lambda: ["instruct_demo"], description="Registered SFT dataset names or data files; the last assistant turn is the reference.")
    registry: str = Field("data/dataset_info.yaml", description="Dataset registry file.")
    max_samples: int | None = Field(64, ge=1, description="Use at most this many samples of each dataset (None: all).")
    cutoff_len: int = Field(1024, ge=8, le=1_048_576, description="Maximum tokens per example for the loss.")
    val_size: float = Field(0.0, ge=0.0, lt=1.0, description="Evaluate only this held-out fraction (the same split as training with the same seed); 0 uses every sample.")
    seed: int = Field(42, description="Seed of the held-out split (the training run's training.seed).")


class EvalGeneration(_Section):
    batch_size: int = Field(8, ge=1, le=1024, description="Prompts generated together (left-padded).")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Longest generated answer, in tokens.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0.0, le=10.0, description="Sampling temperature (do_sample only).")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass (do_sample only).")
    seed: int = Field(42, description="Sampling seed.")


class EvalBenchmark(_Section):
    file: str = Field("data/benchmarks/mcq_demo.jsonl", description="Multiple-choice JSONL: {question, choices: [..] or A/B/C/D columns, answer: letter}.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many questions (None: all).")


class EvalOutput(_Section):
    dir: str = Field("", description="Directory the predictions files (predictions*.jsonl) are written to; empty: the job directory.")
    job_dir: str = Field("", description="Job directory for status, logs and result.json; empty creates workspace/evals/<time>.")
    overwrite: bool = Field(False, description="Allow a non-empty job directory to be replaced.")


class EvalConfig(_Section):
    model: EvalModels = Field(default_factory=EvalModels)
    tasks: EvalTasks = Field(default_factory=EvalTasks)
    data: EvalData = Field(default_factory=EvalData)
    generation: EvalGeneration = Field(default_factory=EvalGeneration)
    benchmark: EvalBenchmark = Field(default_factory=EvalBenchmark)
    output: EvalOutput = Field(default_factory=EvalOutput)


# ---------------------------------------------------------------- export

class ExportModel(_Section):
    checkpoint: str = Field("", description="Checkpoint to export: an adapter (LoRA/QLoRA) or full-weight directory.")
    base: str = Field("", description="Base model the adapter was trained on; empty reads it from the checkpoint (config.yaml, adapter_config.json).")
    trust_remote_code: bool = Field(False, description="Allow the model directory to run its own Python code.")


class ExportOutput(_Section):
    dir: str = Field("", description="Directory the merged model is written to; empty uses <job dir>/model.")
    overwrite: bool = Field(False, description="Replace an existing non-empty output directory.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("bfloat16", description="Dtype of the merged weights (QLoRA adapters are merged into this 16/32-bit base, never into 4-bit weights).")
    max_shard_size: str = Field("2GB", pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$", description="Largest safetensors shard, e.g. 500MB, 2GB.")
    gguf: list[GGUFType] = Field(default_factory=list, description="Also write these GGUF files for llama.cpp-compatible tools (Llama architectures, byte-level BPE tokenizers; q4_0 keeps the embeddings in q8_0), each loaded back and checked.")
    job_dir: str = Field("", description="Job directory for status and logs; empty creates workspace/exports/<time>.")

    @field_validator("gguf")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class ExportVerify(_Section):
    prompt: str = Field("Who are you?", description="Fixed prompt whose logits are compared and whose greedy answer is shown.")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="Length of the verification answer.")
    tolerance: float | None = Field(None, gt=0, description="Largest allowed logit difference; None: 1e-4 (float32), 1% (float16) or 5% (bfloat16) of the largest logit, at least that absolute value.")


class ExportHub(_Section):
    repo_id: str = Field("", description="Push the export to this model hub repository (user/name); empty: don't push.")
    token: str = Field("", description="Hub access token; empty uses $HF_TOKEN.")
    private: bool = Field(True, description="Create the repository as private.")
    endpoint: str = Field("", description="Hub address; empty uses $HF_ENDPOINT or https://huggingface.co.")
    timeout_s: float = Field(30.0, gt=0, le=3600, description="Give up on an unresponsive hub after this many seconds (one attempt, no retries).")


class ExportConfig(_Section):
    model: ExportModel = Field(default_factory=ExportModel)
    output: ExportOutput = Field(default_factory=ExportOutput)
    verify: ExportVerify = Field(default_factory=ExportVerify)
    hub: ExportHub = Field(default_factory=ExportHub)


SCHEMAS: dict[str, type[_Section]] = {"eval": EvalConfig, "export": ExportConfig}


def load_job_config(kind: str, path: str | Path, overrides: list[str] | None = None):
    return load_config(path, overrides, SCHEMAS[kind])
