"""Beyond Llama, end to end: for Qwen2, Mistral and Gemma (tests/families.py), a DeepSpeed-launched LoRA SFT run
(all-linear targets, vocabulary extended) whose checkpoint is merged and exported with verification and chatted with
through the worker, and a QLoRA run on the CPU. One run per family feeds every check after it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.run import launch, rundir
from engine.run.config import RunConfig
from families import family_model

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "vocab_zh_demo.txt"
ZH = "我是 Orion，由 Workbench 团队开发的人工智能助手。"
FAMILIES = ("qwen2", "mistral", "gemma")  # llama: test_train, test_vocab and test_export on the conftest tiny_model
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
pytestmark = pytest.mark.slow


def _cfg(base: Path, run_dir: Path, **sections) -> RunConfig:
    data = {
        "model": {"path": str(base)},
        "method": {"lora_target": "all-linear"},
        "data": {"datasets": ["identity"], "registry": str(ROOT / "data" / "dataset_info.yaml"), "cutoff_len": 128},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                     "learning_rate": 5e-3, "save_steps": 3, "logging_steps": 1, "precision": "fp32"},
        "output": {"run_dir": str(run_dir)},
    }
    for section, values in sections.items():
        data[section].update(values) if section in data else data.setdefault(section, values)
    return RunConfig.model_validate(data)


def _run(cfg: RunConfig) -> Path:
    run_dir = launch.start(cfg)
    status = launch.wait(run_dir, timeout=600)
    assert status is not None and status.state == "completed", (status, rundir.log_tail(run_dir))
    return run_dir


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in rundir.read_metrics(run_dir) if "loss" in r]


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def _adapted(tensors: dict) -> set[tuple[str, str]]:
    """(layer index, module) of every LoRA pair in an adapter's tensors."""
    out = set()
    for key in tensors:
        if ".lora_A." in key:
            parts = key.split(".lora_A.")[0].split(".")
            out.add((parts[parts.index("layers") + 1], parts[-1]))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, base model, run directory) of a 3-step LoRA SFT run, all-linear, with model.extend_vocab."""
    name = request.param
    base = family_model(tmp_path_factory, name)
    run_dir = _run(_cfg(base, tmp_path_factory.mktemp(f"lora-{name}") / "run", model={"extend_vocab": str(DEMO)}))
    return name, base, run_dir


@pytest.fixture(scope="module")
def worker():
    from engine.serve.worker import InferenceWorker

    w = InferenceWorker()  # one process loads each family's checkpoint in turn
    yield w
    w.unload()


def test_lora_sft_all_linear_with_extended_vocabulary(trained):
    from transformers import AutoTokenizer

    name, base, run_dir = trained
    losses = _losses(run_dir)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    tensors = _adapter(run_dir / "final")
    assert _adapted(tensors) == {(layer, m) for layer in ("0", "1") for m in LINEAR}
    assert not any("bias" in k for k in tensors)  # Qwen2's q/k/v biases stay in the base (LoRA bias="none")

    base_size = len(AutoTokenizer.from_pretrained(base))
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    assert len(tok) > base_size and tok("团队", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("团队")]
    full = {k: v for k, v in tensors.items() if "lora_" not in k}
    assert sorted(full) == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"], sorted(full)
    assert all(v.shape == (len(tok), 64) for v in full.values())
    emb, head = full["base_model.model.model.embed_tokens.weight"], full["base_model.model.lm_head.weight"]
    assert torch.equal(emb, head) == (name != "mistral")  # tied families stay tied; Mistral's head is its own
    log = (run_dir / "train.log").read_text()
    vocab = json.loads(next(l for l in log.splitlines() if "engine.train: vocabulary: " in l).split("vocabulary: ", 1)[1])
    assert vocab["base_size"] == base_size and vocab["size"] == len(tok)
    assert "the outputs of 4 norms and 2 gated MLPs" in log  # each family's MLP is gated, two norms a layer


def test_merge_and_export_with_verification(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.jobs.export import export
    from engine.run.jobconfig import ExportConfig

    class Progress:
        def plan(self, total): pass
        def phase(self, text): pass
        def advance(self, n=1, **row): pass

    name, base, run_dir = trained
    cfg = ExportConfig.model_validate({"model": {"checkpoint": str(run_dir / "final")}, "verify": {"prompt": ZH},
                                       "output": {"dir": str(tmp_path / "merged"), "job_dir": str(tmp_path / "job"),
                                                  "dtype": "float32"}})
    result = export(cfg, tmp_path, Progress())
    assert result["verify"]["max_logit_diff"] < 1e-4 and result["verify"]["base_vs_adapter"] > 1e-3, result["verify"]
    out = Path(result["output_dir"])
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.model_type == name and model.config.vocab_size == len(tok)
    tied = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert tied == (name != "mistral")
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (out / "model.safetensors.index.json").is_file() else set(_safetensors_keys(out / "model.safetensors"))
    assert ("lm_head.weight" in names) == (name == "mistral")  # a tied head is saved once, as the embedding
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (name == "qwen2")
    assert not any("lora_" in k or "base_layer" in k for k in names)
    if name in ("mistral", "gemma"):  # llama.cpp's converter reads a SentencePiece family's tokenizer.model
        assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == \
        json.loads((base / "generation_config.json").read_text())["eos_token_id"]


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_chat_through_the_worker(trained, worker):
    from transformers import AutoTokenizer

    from engine.serve.sampling import SamplingParams

    name, base, run_dir = trained
    info = worker.load(str(run_dir / "final"))
    assert info["adapters"] == [str(run_dir / "final")] and info["base"] == str(base) and info["template"] == "auto"
    ask = [{"role": "system", "content": "You are Orion."}, {"role": "user", "content": "你是谁？"}]
    pieces = list(worker.chat(ask, SamplingParams(temperature=0, max_new_tokens=8)))
    assert "".join(pieces) == worker.last.text and 0 < worker.last.completion_tokens <= 8
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    expected = tok.apply_chat_template(ask, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert worker.last.prompt_tokens == len(expected)  # the template's bos is not doubled by the tokenizer
    base_answer = "".join(worker.chat(ask, SamplingParams(temperature=0, max_new_tokens=8), use_adapter=False))
    assert worker.last.completion_tokens > 0 and isinstance(base_answer, str)


# Mistral's and Gemma's 4-bit paths are Llama's (test_train's QLoRA run covers it) with other norms: heavy tests only;
# Qwen2's biased q/k/v projections are the 4-bit case Llama does not have
@pytest.mark.parametrize("name", ["qwen2", pytest.param("mistral", marks=pytest.mark.heavy),
                                  pytest.param("gemma", marks=pytest.mark.heavy)])
def test_qlora_on_cpu(name, tmp_path_factory):
    base = family_model(tmp_path_factory, name)
    cfg = _cfg(base, tmp_path_factory.mktemp(f"qlora-{name}") / "run", model={"quantization": "nf4"},
               method={"finetuning_type": "qlora"})
    run_dir = _run(cfg)
    losses = _losses(run_dir)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert "quantization=nf4, 4-bit=True" in (run_dir / "train.log").read_text()
    assert _adapted(_adapter(run_dir / "final")) == {(layer, m) for layer in ("0", "1") for m in LINEAR}
