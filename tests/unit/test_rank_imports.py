"""The rank's start-up: bitsandbytes stays out of a run that does not use it, and LoRA builds without it; DeepSpeed
imports without mlflow, which stays importable for a run that reports to it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.run.config import RunConfig
from engine.train.entry import skip_bitsandbytes

ROOT = Path(__file__).resolve().parents[2]
MISSING = object()


@pytest.fixture
def modules():
    """sys.modules' bitsandbytes entry, put back as it was after the test."""
    saved = sys.modules.pop("bitsandbytes", MISSING)
    yield sys.modules
    sys.modules.pop("bitsandbytes", None)
    if saved is not MISSING:
        sys.modules["bitsandbytes"] = saved


@pytest.mark.parametrize("change, kept_out", [
    ({}, True),
    ({"model": {"quantization": "nf4"}, "method": {"finetuning_type": "qlora"}}, False),
    ({"training": {"optim": "paged_adamw_8bit"}}, False),
    ({"training": {"optim": "adamw_8bit"}}, False),
])
def test_bitsandbytes_is_kept_out_only_where_unused(modules, change, kept_out):
    cfg = RunConfig.model_validate(change)
    assert skip_bitsandbytes(cfg) is kept_out
    assert ("bitsandbytes" in modules and modules["bitsandbytes"] is None) is kept_out


def test_an_imported_bitsandbytes_is_left_alone(modules):
    modules["bitsandbytes"] = sys  # any module object: already imported
    assert skip_bitsandbytes(RunConfig()) is False and modules["bitsandbytes"] is sys


def test_lora_builds_without_bitsandbytes():
    """In a fresh interpreter, as the rank: PEFT, Accelerate and Transformers take it as not installed."""
    code = """
import sys
from engine.run.config import RunConfig
from engine.train.entry import skip_bitsandbytes
assert skip_bitsandbytes(RunConfig())
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from transformers.utils import is_bitsandbytes_available
from accelerate.utils import is_bnb_available
model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, vocab_size=64))
model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
assert model.get_nb_trainable_parameters()[0] > 0
assert not is_bitsandbytes_available() and not is_bnb_available()
assert sys.modules["bitsandbytes"] is None and "torch._inductor.compile_fx" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_deepspeed_imports_without_mlflow_which_stays_importable():
    """The launcher (engine.run.dslaunch) and the rank import DeepSpeed so: its autotuner would import mlflow."""
    code = """
import sys
from engine.run.dslaunch import import_deepspeed
import_deepspeed()
assert "deepspeed.autotuning.autotuner" in sys.modules and "mlflow" not in sys.modules
import mlflow.tracking
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.splitlines()[-1:] == ["ok"], out.stderr[-3000:]
