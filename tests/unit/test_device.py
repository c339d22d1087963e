"""The chat / API device option: auto, cpu, cuda, cuda:N or N; a GPU the machine lacks is refused in one sentence."""

from __future__ import annotations

import pytest
import torch

from engine.serve.inference import resolve_device
from engine.serve.sampling import InferenceError


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("given, expected", [(None, "cuda:0"), ("auto", "cuda:0"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1"),
                                             ("1", "cuda:1"), ("CPU", "cpu")])
def test_two_gpus(two_gpus, given, expected):
    assert resolve_device(given) == expected


@pytest.mark.parametrize("given, words", [("cuda:2", "cuda:2 is not on this machine (GPUs: cuda:0, cuda:1)"),
                                          ("gpu", "'gpu' is not a device; use auto, cpu, cuda or cuda:N")])
def test_refused(two_gpus, given, words):
    with pytest.raises(InferenceError) as err:
        resolve_device(given)
    assert str(err.value) == f"device: {words}"


def test_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(InferenceError, match="GPUs: none, only the CPU"):
        resolve_device("cuda")


def test_cli_takes_it():
    from engine.cli import build_parser

    args = build_parser().parse_args(["api", "--model", "m", "--device", "cuda:1"])
    assert args.device == "cuda:1"
    assert build_parser().parse_args(["chat", "--model", "m"]).device == "auto"
