"""The chat worker process: load, stream, stop, bad input, unload frees its memory; the parent stays torch-free."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from chat_fixtures import make_lora_run
from engine.serve.sampling import SamplingParams
from engine.serve.worker import InferenceWorker, WorkerError

ASK = [{"role": "user", "content": "Who are you?"}]


def test_worker_lifecycle(tiny_model, tmp_path):
    run = make_lora_run(tiny_model, tmp_path)
    worker = InferenceWorker()
    with pytest.raises(WorkerError, match="model not found"):
        worker.load(str(tmp_path / "runs" / "nope"))
    assert worker.alive  # a bad load leaves the worker up
    before_load = worker.rss()
    info = worker.load(str(run / "checkpoint-5"))
    assert info["adapters"] == [str(run / "checkpoint-5")] and info["template"] == "auto"
    assert info["rss"] > before_load  # the weights live in the worker, not here
    pid = worker.proc.pid

    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    pieces = list(worker.chat(ASK, greedy))
    assert len(pieces) > 1 and "".join(pieces) == worker.last.text and worker.last.completion_tokens == 12
    tuned = worker.last.text
    base = "".join(worker.chat(ASK, greedy, use_adapter=False))
    assert base != tuned  # side by side: the base model (adapter disabled) answers differently
    assert "".join(worker.chat(ASK, greedy, use_adapter=False)) == base

    stream = worker.chat(ASK, SamplingParams(temperature=0, max_new_tokens=500))
    next(stream)
    worker.stop()
    list(stream)
    assert worker.last.finish_reason == "cancelled" and worker.last.completion_tokens < 500

    with pytest.raises(WorkerError, match="empty"):
        list(worker.chat([], greedy))
    with pytest.raises(WorkerError, match="context window"):
        list(worker.chat([{"role": "user", "content": "hello " * 2100}], greedy))
    assert "".join(worker.chat(ASK, greedy)) == worker.last.text  # still serving

    freed = worker.unload()
    assert freed > 100 * 2**20 and not worker.alive
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(WorkerError, match="no model is loaded"):
        list(worker.chat(ASK, greedy))


def test_parent_side_imports_no_torch(default_model):
    code = ("import sys, engine.serve.worker, engine.serve.sampling\n"
            "from engine.serve.compare import plan\nfrom engine.serve.sampling import resolve_target\n"
            f"assert plan(resolve_target({str(default_model)!r}), {str(default_model)!r}).kind == 'same'\n"
            "print('torch' in sys.modules)")  # planning a side-by-side comparison loads no torch either
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_memory_estimate_and_refusal(default_model, monkeypatch):
    from types import SimpleNamespace

    from engine.serve import worker as w
    from engine.serve.sampling import InferenceError

    full = w.estimate_bytes(str(default_model), [], "none", on_gpu=False)
    assert 130e6 * 4 < full < 140e6 * 4 * 1.1  # ~135M parameters in float32
    assert w.estimate_bytes(str(default_model), [], "nf4", on_gpu=False) < full / 6
    monkeypatch.setattr(w.psutil, "virtual_memory", lambda: SimpleNamespace(available=full // 2))
    with pytest.raises(InferenceError, match=r"needs about 0\.\d\d GiB, and 0\.\d\d GiB is available") as err:
        w.check_fits(full)
    assert err.value.kind == "out_of_memory"


def test_device_option_and_unload_report(tiny_model):
    worker = InferenceWorker()
    try:
        with pytest.raises(WorkerError, match=r"device: cuda:1 is not on this machine \(GPUs: none, only the CPU\)"):
            worker.load(str(tiny_model), device="cuda:1")  # refused before any weights load
        info = worker.load(str(tiny_model), device="cpu")
        assert info["device"] == "cpu" and "gpu_allocated" not in info
        worker.unload()
        assert worker.freed["device"] == "cpu" and worker.freed["rss"] > 0 and not worker.alive
    finally:
        worker.unload()
