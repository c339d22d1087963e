"""Shared fixtures: the prepared default model's tokenizer and a tiny random model built on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
SHARED = ROOT.parent / "shared"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model() -> Path:
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        from engine.jobs.prepare import prepare_model

        prepare_model(DEFAULT_MODEL)
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


@pytest.fixture(scope="session")
def tiny_model(default_model, tmp_path_factory) -> Path:
    """A 2-layer random Llama over the default model's tokenizer, saved as a local HF directory (tests/families.py
    builds it, next to the Qwen2, Mistral and Gemma ones)."""
    from families import build_family

    return build_family("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    path = SHARED / "datasets"
    if not path.is_dir():
        pytest.skip("../shared/datasets is not present")
    return path
