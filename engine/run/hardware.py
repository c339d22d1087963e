"""What this machine can run fast, read without torch (so the UI and the checks stay light).

A CPU without bf16 matrix units (no avx512_bf16 / amx_bf16 flag, e.g. an AVX2-only one) emulates bf16
matmuls, which makes bf16 training there many times slower than fp32.

Training on a CPU preloads tcmalloc or jemalloc where one is installed, as PyTorch's own CPU launcher
(``torch.backends.xeon.run_cpu``) does: glibc's malloc keeps the freed blocks of steps of changing sizes
fragmented in its heap, so a run's RSS grows well past what it holds live (README: Speed on the CPU).
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
from pathlib import Path

# What a CPU training process holds besides its weights, trained parameters' states and activations. The first
# step's peak RSS, measured with tcmalloc on the default model (README: Speed on the CPU), was what the process held
# before it + the gradients, optimizer state and loss chunk + about 0.6 GB whatever the length (the libraries' working
# memory) + 1.1 to 1.2 x the planned activations, at 1k to 16k tokens, with and without checkpointing; the imported
# libraries held 0.56 GB before the first step (1.10 GB held, 0.54 GB of it weights). The checkpointing plan
# (engine.train.activations) and the Model tab's estimate (webui.modelinfo) keep these margins.
CPU_FIXED = 0.6e9
CPU_SLACK = 1.25
CPU_LIBRARIES = 0.56e9

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


def computes_in_16_bits(precision: str, gpu: bool, flags: set[str] | None = None) -> bool:
    """Whether ``training.precision`` trains in bf16 or fp16 here, as the rank resolves it
    (engine.train.model_setup.resolve_precision, by the same flags): ``auto`` does on a GPU and on a CPU with bf16
    units."""
    if precision != "auto":
        return precision in ("bf16", "fp16")
    return gpu or cpu_has_bf16(cpu_flags() if flags is None else flags)


# PyTorch's CPU launcher's order and jemalloc setting (torch/backends/xeon/run_cpu.py), with the versioned names
# the runtime packages install (Debian: libtcmalloc-minimal4, libjemalloc2) besides the development links.
ALLOCATORS = {"tcmalloc": ("libtcmalloc.so", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc_minimal.so.4"),
              "jemalloc": ("libjemalloc.so", "libjemalloc.so.2")}
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto"
ALLOCATOR_ENV = "WORKBENCH_CPU_ALLOCATOR"  # auto (default), tcmalloc, jemalloc or system (glibc's own)


def _library_dirs() -> list[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [os.environ.get("CONDA_PREFIX", ""), sys.prefix, os.environ.get("VIRTUAL_ENV", "")]
    out = [f"{d}/lib" for d in dirs if d]
    out += [os.path.expanduser("~/.local/lib"), "/usr/local/lib", "/usr/local/lib64"]
    out += [f"/usr/lib/{multiarch}", f"/lib/{multiarch}"] if multiarch else []
    return out + ["/usr/lib", "/usr/lib64"]


def find_allocator(name: str) -> str | None:
    """The path of the ``name`` allocator's shared library (tcmalloc, jemalloc), or None."""
    for folder in _library_dirs():
        for lib in ALLOCATORS[name]:
            found = glob.glob(os.path.join(folder, lib))
            if found:
                return found[0]
    return None


def allocator_env(gpu: bool | None = None, environ: dict | None = None) -> dict[str, str]:
    """Environment additions that make CPU ranks use tcmalloc or jemalloc (LD_PRELOAD), as chosen by
    WORKBENCH_CPU_ALLOCATOR (auto: the first found; system: none). Nothing on a GPU machine, nothing when the
    environment already preloads one."""
    environ = os.environ if environ is None else environ
    wanted = environ.get(ALLOCATOR_ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "system", *ALLOCATORS):
        raise ValueError(f"{ALLOCATOR_ENV}={wanted!r}: expected auto, system, tcmalloc or jemalloc")
    preload = environ.get("LD_PRELOAD", "")
    if wanted == "system" or (has_gpu() if gpu is None else gpu) or any(n in preload for n in ALLOCATORS):
        return {}
    for name in ALLOCATORS if wanted == "auto" else (wanted,):
        path = find_allocator(name)
        if path:
            env = {"LD_PRELOAD": os.pathsep.join(filter(None, [path, preload]))}
            if name == "jemalloc" and "MALLOC_CONF" not in environ:
                env["MALLOC_CONF"] = JEMALLOC_CONF
            return env
    return {}


def allocator_in_use() -> str:
    """The malloc this process runs on (read from its mapped libraries): tcmalloc, jemalloc or glibc."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown"
    return next((name for name in ALLOCATORS if f"lib{name}" in maps), "glibc")
