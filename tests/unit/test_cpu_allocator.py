"""CPU ranks run on tcmalloc or jemalloc where one is installed (PyTorch's CPU launcher's order), chosen without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.run import hardware


@pytest.fixture
def libdir(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "_library_dirs", lambda: [str(tmp_path / "empty"), str(tmp_path)])
    return tmp_path


def test_tcmalloc_first_then_jemalloc_with_its_setting(libdir):
    assert hardware.allocator_env(gpu=False, environ={}) == {}  # nothing installed: glibc, nothing set
    (libdir / "libjemalloc.so.2").write_bytes(b"")
    assert hardware.allocator_env(gpu=False, environ={}) == {
        "LD_PRELOAD": str(libdir / "libjemalloc.so.2"), "MALLOC_CONF": hardware.JEMALLOC_CONF}
    (libdir / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert hardware.allocator_env(gpu=False, environ={"LD_PRELOAD": "/opt/x.so"}) == {
        "LD_PRELOAD": f"{libdir / 'libtcmalloc_minimal.so.4'}:/opt/x.so"}  # what was preloaded stays, after it
    chosen = hardware.allocator_env(gpu=False, environ={hardware.ALLOCATOR_ENV: "jemalloc", "MALLOC_CONF": "a:1"})
    assert chosen == {"LD_PRELOAD": str(libdir / "libjemalloc.so.2")}  # the user's own MALLOC_CONF is kept


def test_nothing_on_a_gpu_when_asked_for_glibc_or_already_preloaded(libdir):
    (libdir / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert hardware.allocator_env(gpu=True, environ={}) == {}
    assert hardware.allocator_env(gpu=False, environ={hardware.ALLOCATOR_ENV: "system"}) == {}
    assert hardware.allocator_env(gpu=False, environ={"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == {}
    with pytest.raises(ValueError, match=r"WORKBENCH_CPU_ALLOCATOR='mimalloc': expected auto, system, tcmalloc"):
        hardware.allocator_env(gpu=False, environ={hardware.ALLOCATOR_ENV: "mimalloc"})


@pytest.mark.skipif(hardware.find_allocator("tcmalloc") is None and hardware.find_allocator("jemalloc") is None,
                    reason="neither tcmalloc nor jemalloc is installed (.ci/run installs libtcmalloc-minimal4)")
def test_a_process_started_with_the_env_runs_on_it():
    env = hardware.allocator_env(gpu=False, environ={})
    code = "from engine.run.hardware import allocator_in_use; print(allocator_in_use())"
    used = subprocess.run([sys.executable, "-c", code], env={**env, "PATH": ""}, capture_output=True, text=True,
                          check=True, cwd=str(hardware.Path(__file__).resolve().parents[2])).stdout.strip()
    assert used == ("tcmalloc" if "tcmalloc" in env["LD_PRELOAD"] else "jemalloc")
    plain = subprocess.run([sys.executable, "-c", code], env={"PATH": ""}, capture_output=True, text=True, check=True,
                           cwd=str(hardware.Path(__file__).resolve().parents[2])).stdout.strip()
    assert plain == "glibc"
