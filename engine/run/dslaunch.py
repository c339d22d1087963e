"""DeepSpeed's per-node launcher, ``deepspeed.launcher.launch``, run unchanged as ``python -m engine.run.dslaunch``
with the same arguments, only imported with mlflow hidden.

Importing DeepSpeed imports its autotuner, which imports mlflow whenever mlflow is installed (the ``trackers``
extra installs it): measured on 2 cores, 1.8 s of the launcher's 4.3 s import, spent before the first rank starts,
and again in every rank. Neither the launcher nor the trainer autotunes, so both import DeepSpeed with mlflow
hidden (its autotuner then records ``has_mlflow = False``); a rank that reports to mlflow imports it afterwards as
usual."""

from __future__ import annotations

import contextlib
import runpy
import sys


@contextlib.contextmanager
def mlflow_hidden():
    """Within: ``import mlflow`` fails at once (a ``None`` in ``sys.modules``); after: importable again."""
    if "mlflow" in sys.modules:
        yield
        return
    sys.modules["mlflow"] = None
    try:
        yield
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]


def import_deepspeed():
    """``import deepspeed``, without its autotuner's mlflow import."""
    with mlflow_hidden():
        import deepspeed
    return deepspeed


if __name__ == "__main__":
    import_deepspeed()  # the launcher's own imports then find it done
    runpy.run_module("deepspeed.launcher.launch", run_name="__main__", alter_sys=True)
