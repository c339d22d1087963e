"""bf16 on a CPU without bf16 units: read from /proc/cpuinfo without torch, warned about before launch."""

from __future__ import annotations

import pytest

from engine.run import hardware
from engine.run.checks import warnings
from engine.run.config import RunConfig

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_flags_from_cpuinfo():
    assert hardware.cpu_flags(AVX2) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert not hardware.cpu_has_bf16(hardware.cpu_flags(AVX2))
    assert hardware.cpu_has_bf16(hardware.cpu_flags(SAPPHIRE))
    assert hardware.cpu_flags("") == set()


@pytest.mark.parametrize("flags, gpu, slow", [
    (AVX2, False, True), (SAPPHIRE, False, False), (AVX2, True, False), ("", False, False),  # unknown CPU: no guess
])
def test_slow_bf16(flags, gpu, slow):
    assert hardware.slow_bf16_on_cpu(hardware.cpu_flags(flags), gpu) is slow


def test_gpu_hidden_by_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not hardware.has_gpu()


@pytest.fixture
def avx2_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "slow_bf16_on_cpu", lambda flags=None, gpu=None: True)


def test_warning_names_the_field(avx2_cpu):
    cfg = RunConfig.model_validate({"training": {"precision": "bf16"}})
    [(field, text)] = warnings(cfg)
    assert field == "training.precision" and "25x slower" in text and "avx512_bf16" in text
    assert warnings(RunConfig()) == []  # auto resolves to fp32 there: nothing to say
    both = RunConfig.model_validate({"training": {"precision": "bf16"}, "model": {"dtype": "bfloat16"}})
    assert [f for f, _ in warnings(both)] == ["training.precision", "model.dtype"]


def test_no_warning_where_bf16_is_fast(monkeypatch):
    monkeypatch.setattr(hardware, "slow_bf16_on_cpu", lambda flags=None, gpu=None: False)
    assert warnings(RunConfig.model_validate({"training": {"precision": "bf16"}})) == []


def test_workbench_train_prints_it_before_launch(avx2_cpu, capsys, tmp_path):
    from engine.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("training:\n  precision: bf16\ndata:\n  datasets: []\n")  # refused, so nothing starts
    assert main(["train", str(cfg), "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "warning: training.precision: bf16 on this CPU is about 25x slower" in err
    assert "data.datasets" in err and not (tmp_path / "runs").exists()


def test_train_tab_shows_it(avx2_cpu):
    from webui.tabs.train import warning_html

    html = warning_html("en", RunConfig.model_validate({"training": {"precision": "bf16"}}))
    assert "wb-msg-warn" in html and "25x slower" in html and "Warnings" in html
    assert warning_html("zh", RunConfig()) == ""
