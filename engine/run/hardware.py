"""What this machine can run fast, read without torch (so the UI and the checks stay light).

A CPU without bf16 matrix units (no avx512_bf16 / amx_bf16 flag, e.g. an AVX2-only one) emulates bf16
matmuls, which makes bf16 training there many times slower than fp32.
"""

from __future__ import annotations

import os
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (or of the given text); empty where there is no such file."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_bf16(flags: set[str]) -> bool:
    return any(f in flags for f in BF16_FLAGS)


def gpu_count() -> int:
    """How many NVIDIA GPUs the driver lists on this machine (0 without a driver); CUDA_VISIBLE_DEVICES aside."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return sum(1 for _ in gpus.iterdir()) if gpus.is_dir() else 0


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible to a run started from here (its driver's device list, CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def slow_bf16_on_cpu(flags: set[str] | None = None, gpu: bool | None = None) -> bool:
    """bf16 would run emulated here: no GPU, and a CPU without bf16 units (and flags known at all)."""
    flags = cpu_flags() if flags is None else flags
    gpu = has_gpu() if gpu is None else gpu
    return not gpu and bool(flags) and not cpu_has_bf16(flags)
