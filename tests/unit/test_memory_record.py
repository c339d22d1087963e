"""metrics.jsonl memory: per-rank GPU peaks on CUDA (a fake cuda module here), the process RSS on CPU; the card's cell."""

from __future__ import annotations

from types import SimpleNamespace

import psutil

from engine.train.callbacks import memory_record
from webui.views import memory_cell


class FakeCuda:
    def __init__(self, allocated, reserved):
        self.allocated, self.reserved = allocated, reserved

    def is_available(self):
        return True

    def max_memory_allocated(self):
        return self.allocated

    def max_memory_reserved(self):
        return self.reserved


def test_gpu_peaks_per_rank():
    mine = FakeCuda(3 * 2**30, 4 * 2**30)
    other = [5000.0, 6000.0]  # what rank 1 reports through the gather
    record = memory_record(mine, gather=lambda values: [values, other])
    assert record == {"memory_mb": 5000.0, "gpu_allocated_mb": [3072.0, 5000.0], "gpu_reserved_mb": [4096.0, 6000.0]}


def test_single_gpu_without_process_group():
    record = memory_record(FakeCuda(2**29, 2**30))  # the default gather: no process group, just this rank
    assert record == {"memory_mb": 512.0, "gpu_allocated_mb": [512.0], "gpu_reserved_mb": [1024.0]}


def test_cpu_is_resident_memory():
    record = memory_record(SimpleNamespace(is_available=lambda: False))
    assert set(record) == {"memory_mb"}
    rss = psutil.Process().memory_info().rss / 2**20
    assert abs(record["memory_mb"] - rss) < 0.2 * rss


def test_card_cell_per_gpu():
    row = {"memory_mb": 5000.0, "gpu_allocated_mb": [3072.0, 5000.0], "gpu_reserved_mb": [4096.0, 6000.0]}
    assert memory_cell(row, ("2", "3")) == "GPU 2: 3.00 GB / 4.00 GB · GPU 3: 4.88 GB / 5.86 GB"
    assert memory_cell(row) == "GPU 0: 3.00 GB / 4.00 GB · GPU 1: 4.88 GB / 5.86 GB"
    assert memory_cell({"memory_mb": 700.0}, ("cpu",)) == "700 MB"
    assert memory_cell({}) == "–"


def test_run_card_shows_each_gpu():
    from webui.metrics import MetricSeries
    from webui.runs import RunInfo
    from webui.views import run_card

    series = MetricSeries.__new__(MetricSeries)
    series.latest = {"step": 3, "memory_mb": 900.0, "gpu_allocated_mb": [900.0], "gpu_reserved_mb": [1200.0]}
    series.train, series.eval = {}, {}
    info = RunInfo(id="r", path=None, state="running", step=3, total_steps=10, devices=("0",))
    assert "GPU 0: 900 MB / 1.17 GB" in run_card("en", info, series)
