"""Typed configs of the evaluation and export jobs (one schema each), loaded like the run config.

For every job kind ``output.job_dir`` (a run's ``output.run_dir``) is the job's own directory and
``output.dir`` is where its product goes (eval: the predictions; export: the merged model).

``workbench eval CONFIG`` / ``workbench export CONFIG`` and the web UI's tabs both build these;
the job process reads them back from ``<job_dir>/config.yaml``. Imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from engine.run.config import DEFAULT_REGISTRY, load_config
from engine.run.config import Section as _Section
from engine.serve.sampling import SamplingParams

JobKind = Literal["eval", "export"]
# llama.cpp's types that need no importance matrix: the converter's (f32, f16, bf16, q8_0), then the quantizer's.
GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1",
                   "q4_0", "iq4_nl", "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k"]


# ---------------------------------------------------------------- evaluation

class EvalModels(_Section):
    base: str = Field("", json_schema_extra={"path": "path"}, description="Base model directory; empty reads it from the first checkpoint's run config (model.path).")
    checkpoints: list[str] = Field(default_factory=list, json_schema_extra={"path": "path"}, description="Checkpoints to evaluate (adapter or full-weight directories: checkpoint-N, final, or an export).")
    include_base: bool = Field(True, description="Also evaluate the base model, as the first row of the comparison.")
    template: str = Field("auto", description="Chat template: 'auto' uses each checkpoint's saved chat template, or a registry name.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype the weights are evaluated in (QLoRA bases are loaded unquantized).")
    trust_remote_code: bool = Field(False, description="Allow the model directory to run its own Python code.")


class EvalTasks(_Section):
    loss: bool = Field(True, description="Loss and perplexity on the answers of the dataset (prompt tokens masked, as in training).")
    generation: bool = Field(True, description="Generate answers for the dataset's prompts and score them with BLEU-4 and ROUGE-1/2/L.")
    choice: bool = Field(False, description="Multiple-choice benchmark accuracy (benchmark.file), scored by the log-likelihood of each choice.")
    harness: bool = Field(False, description="Standard benchmarks through lm-evaluation-harness (harness.tasks).")


class EvalData(_Section):
    datasets: list[str] = Field(default_factory=lambda: ["instruct_demo"], json_schema_extra={"path": "dataset"}, description="Registered SFT dataset names or data files; the last assistant turn is the reference.")
    registry: str = Field(DEFAULT_REGISTRY, json_schema_extra={"path": "path"}, description="Dataset registry file.")
    max_samples: int | None = Field(64, ge=1, description="Use at most this many samples of each dataset (None: all).")
    cutoff_len: int = Field(1024, ge=8, le=1_048_576, description="Maximum tokens per example for the loss.")
    val_size: float = Field(0.0, ge=0.0, lt=1.0, description="Evaluate only this held-out fraction (the same split as training with the same seed); 0 uses every sample.")
    seed: int = Field(42, description="Seed of the held-out split (the training run's training.seed).")


class EvalGeneration(_Section):
    batch_size: int = Field(8, ge=1, le=1024, description="Prompts generated together (left-padded).")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Longest generated answer, in tokens.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    # do_sample only; the chat's sampling controls, so both take the same bounds (0 = greedy)
    temperature: float = SamplingParams.model_fields["temperature"]
    top_p: float = SamplingParams.model_fields["top_p"]
    seed: int = Field(42, description="Sampling seed.")


class EvalBenchmark(_Section):
    file: str = Field("data/benchmarks/mcq_demo.jsonl", json_schema_extra={"path": "path"}, description="Multiple-choice JSONL: {question, choices: [..] or A/B/C/D columns, answer: letter}.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many questions (None: all).")


class EvalHarness(_Section):
    tasks: list[str] = Field(default_factory=lambda: ["workbench_mcq_demo"], min_length=1, description="lm-evaluation-harness task or group names (arc_easy, hellaswag, mmlu, ... where the Hub is reachable), or the project's offline tasks in data/benchmarks/harness (workbench_mcq_demo, workbench_gen_demo).")
    num_fewshot: int = Field(0, ge=0, le=25, description="Solved examples put before each question (few-shot count).")
    limit: int | None = Field(None, ge=1, le=1_000_000, description="Use at most this many examples of each task (None: all).")
    batch_size: int = Field(8, ge=1, le=1024, description="Requests scored together.")
    chat_template: bool = Field(False, description="Wrap each prompt in the model's chat template (as the multiple-choice task does); off scores raw text, as published results do.")


class EvalOutput(_Section):
    dir: str = Field("", json_schema_extra={"path": "path"}, description="Directory the predictions files (predictions*.jsonl) are written to; empty: the job directory.")
    job_dir: str = Field("", json_schema_extra={"path": "path"}, description="Job directory for status, logs and result.json; empty creates workspace/evals/<time>.")
    overwrite: bool = Field(False, description="Allow a non-empty job directory to be replaced.")


class EvalConfig(_Section):
    model: EvalModels = Field(default_factory=EvalModels)
    tasks: EvalTasks = Field(default_factory=EvalTasks)
    data: EvalData = Field(default_factory=EvalData)
    generation: EvalGeneration = Field(default_factory=EvalGeneration)
    benchmark: EvalBenchmark = Field(default_factory=EvalBenchmark)
    harness: EvalHarness = Field(default_factory=EvalHarness)
    output: EvalOutput = Field(default_factory=EvalOutput)


# ---------------------------------------------------------------- export

class ExportModel(_Section):
    checkpoint: str = Field("", json_schema_extra={"path": "path"}, description="Checkpoint to export: an adapter (LoRA/QLoRA) or full-weight directory.")
    base: str = Field("", json_schema_extra={"path": "path"}, description="Base model the adapter was trained on; empty reads it from the checkpoint (config.yaml, adapter_config.json).")
    trust_remote_code: bool = Field(False, description="Allow the model directory to run its own Python code.")


class ExportOutput(_Section):
    dir: str = Field("", json_schema_extra={"path": "path"}, description="Directory the merged model is written to; empty uses <job dir>/model.")
    overwrite: bool = Field(False, description="Replace an existing non-empty output directory.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("bfloat16", description="Dtype of the merged weights (QLoRA adapters are merged into this 16/32-bit base, never into 4-bit weights).")
    max_shard_size: str = Field("2GB", pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$", description="Largest safetensors shard, e.g. 500MB, 2GB.")
    gguf: list[GGUFType] = Field(default_factory=list, description="Also write these GGUF files (llama.cpp's converter and quantizer, from the [gguf] extra), each with an Ollama Modelfile, each loaded in llama.cpp and checked against the merged model.")
    job_dir: str = Field("", json_schema_extra={"path": "path"}, description="Job directory for status and logs; empty creates workspace/exports/<time>.")

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
