"""The chat model's own process: the web UI talks to it through a pipe and never imports torch for chat.

Parent side, :class:`InferenceWorker` (imports no torch): ``load`` starts a spawned process and
loads a model there, ``chat`` streams text pieces back, ``stop`` cancels the current answer, and
``unload`` ends the process, so every byte of its memory (and VRAM) goes back to the system.

Messages (tuples over a multiprocessing Pipe):
  parent -> worker: ("load", {model, adapters, quantization, template, device}), ("chat", messages, params, use_adapter),
                    ("stop",), ("unload",), ("exit",)
  worker -> parent: ("loaded", info) | ("piece", text) | ("done", result) | ("unloaded", info)
                    | ("error", message, kind)

With a workspace, the worker reserves its device (the first visible GPU, or the CPU) in that workspace's
device queue from Load to Unload, so a run started meanwhile waits for it; a reservation whose process
died is stale and ignored.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
from pathlib import Path
from typing import Iterator

import psutil

from engine.serve.sampling import InferenceError, Result, SamplingParams, resolve_target, weights_bytes

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def rss_bytes(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def estimate_bytes(model: str, adapters: list[str], quantization: str, on_gpu: bool) -> int:
    """Memory the weights take once loaded (stored size scaled to the load dtype and quantization)."""
    target = resolve_target(model, adapters)
    stored = weights_bytes(target.base)
    try:
        stored_dtype = json.loads((Path(target.base) / "config.json").read_text()).get("torch_dtype") or "float32"
    except (OSError, ValueError):
        stored_dtype = "float32"
    params = stored / _BYTES.get(stored_dtype, 4)
    per_param = {"nf4": 0.56, "fp4": 0.56, "int8": 1.1}.get(quantization, 2 if on_gpu else 4)
    return int(params * per_param) + sum(weights_bytes(a) for a in target.adapters)


def check_fits(need: int, device: str = "cpu") -> None:
    """Refuse a load that would not fit in free memory of ``device`` ('cpu' or 'cuda:N'), before touching the weights."""
    import torch

    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        if need * 1.2 > free:
            raise InferenceError(f"not enough free GPU memory to load this model: it needs about {gib(need)} plus room to "
                                 f"generate, and {gib(free)} is free on {device} (is a training run "
                                 "using it? wait for it to finish, or load in 4-bit)", "out_of_memory")
    else:
        free = psutil.virtual_memory().available
        if need * 1.2 > free:
            raise InferenceError(f"not enough free memory to load this model: it needs about {gib(need)}, and "
                                 f"{gib(free)} is available", "out_of_memory")


def memory_info(device: str = "cpu") -> dict:
    import os

    import torch

    info = {"pid": os.getpid(), "rss": rss_bytes(os.getpid()), "device": device}
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(device)
        info.update(gpu_allocated=torch.cuda.memory_allocated(device), gpu_free=free, gpu_total=total)
    return info


def _main(conn) -> None:  # pragma: no cover - runs in the child process (exercised by tests through the pipe)
    import logging
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    chat = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if msg[0] == "exit":
                return
            if msg[0] == "unload":
                device = chat.device if chat is not None else "cpu"
                if chat is not None:
                    chat.unload()
                chat = None
                conn.send(("unloaded", memory_info(device)))
            elif msg[0] == "load":
                from engine.serve.inference import ChatModel, resolve_device

                spec = msg[1]
                if chat is not None:
                    chat.unload()
                chat = None
                device = resolve_device(spec.get("device"))
                check_fits(estimate_bytes(spec["model"], spec.get("adapters") or [], spec.get("quantization", "none"),
                                          device.startswith("cuda")), device)
                chat = ChatModel.load(spec["model"], adapters=spec.get("adapters"), quantization=spec.get("quantization", "none"),
                                      template=spec.get("template"), device=device)
                conn.send(("loaded", dict(memory_info(device), warnings=chat.warnings, template=chat.template.name,
                                          base=chat.target.base, adapters=chat.target.adapters,
                                          context_window=chat.context_window)))
            elif msg[0] == "chat":
                if chat is None:
                    raise InferenceError("no model is loaded; press Load first")
                _stream(conn, chat, msg[1], SamplingParams(**msg[2]), msg[3], msg[4] if len(msg) > 4 else None)
            elif msg[0] == "stop":
                continue  # a stop that arrived after its answer ended
        except InferenceError as err:
            conn.send(("error", str(err), err.kind))
        except Exception as err:  # noqa: BLE001 - the worker stays up and reports
            kind = "out_of_memory" if "out of memory" in str(err).lower() else "runtime"
            conn.send(("error", f"{type(err).__name__}: {err}", kind))


def _stream(conn, chat, messages, params, use_adapter, tools=None) -> None:
    stream = chat.stream(messages, params, use_adapter=use_adapter, tools=tools)
    for piece in stream:
        conn.send(("piece", piece))
        while conn.poll():
            if conn.recv()[0] == "stop":
                stream.cancel()
    done = stream.result.model_dump()
    if tools:
        done["tool_calls"] = chat.tool_calls(stream.result)[1]
    conn.send(("done", done))


class WorkerError(RuntimeError):
    def __init__(self, message: str, kind: str = "runtime"):
        self.kind = kind
        super().__init__(message)


class InferenceWorker:
    """One chat model in one child process. Calls come from any thread; one request runs at a time."""

    def __init__(self, workspace: str | Path | None = None):
        self.workspace = workspace  # where the device is reserved while a model is loaded (None: not reserved)
        self.reservation = f"chat-{os.getpid()}-{id(self):x}"
        self.proc = None
        self.conn = None
        self.info: dict | None = None
        self.freed: dict | None = None  # the worker's memory_info after its last unload
        self.last: Result | None = None
        self.last_calls: list[dict] = []
        self._busy = threading.Lock()
        self._send = threading.Lock()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    @property
    def loaded(self) -> bool:
        return self.alive and self.info is not None

    def rss(self) -> int:
        return rss_bytes(self.proc.pid) if self.alive else 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_main, args=(child,), daemon=True, name="workbench-chat")
        self.proc.start()
        child.close()

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.exitcode if self.proc else None
            self.info = None
            raise WorkerError(f"the chat worker died (exit code {code}); it may have run out of memory — load again",
                              "killed") from None

    def load(self, model: str, adapters: list[str] | None = None, quantization: str = "none",
             template: str | None = None, device: str | None = None) -> dict:
        """Load in the worker onto ``device`` (auto, cpu, cuda:N; auto is the first GPU, else the CPU)."""
        with self._busy:
            if not self.alive:
                self._start()
            self.info = None
            self._reserve()  # before the weights load: a queued run must not start on the device meanwhile
            self.conn.send(("load", dict(model=model, adapters=adapters or [], quantization=quantization, template=template,
                                         device=device)))
            try:
                reply = self._recv()
            except WorkerError:
                self._release()
                raise
            if reply[0] == "error":
                self._release()
                raise WorkerError(reply[1], reply[2])
            self.info = reply[1]
            return self.info

    def _queue(self):
        from engine.run.queue import DeviceQueue

        return DeviceQueue(self.workspace) if self.workspace is not None else None

    def _reserve(self) -> None:
        """Hold the worker's device in the workspace's device queue while its process lives (stale once it dies)."""
        if (queue := self._queue()) is not None:
            queue.reserve(self.reservation, self.proc.pid, what="chat")

    def _release(self) -> None:
        if (queue := self._queue()) is not None:
            queue.release(self.reservation)

    def chat(self, messages: list[dict], params: SamplingParams, use_adapter: bool = True,
             tools: list[dict] | None = None) -> Iterator[str]:
        """Yields text pieces; afterwards ``self.last`` holds the Result and ``self.last_calls`` the tool calls
        the answer makes (with ``tools``: the function schemas the model is shown)."""
        if not self.loaded:
            raise WorkerError("no model is loaded; press Load first", "invalid_request")
        with self._busy:
            self.last, self.last_calls = None, []
            with self._send:
                self.conn.send(("chat", messages, params.model_dump(), use_adapter, tools))
            finished = False
            try:
                while True:
                    reply = self._recv()
                    if reply[0] == "piece":
                        yield reply[1]
                    elif reply[0] == "done":
                        finished = True
                        self.last_calls = reply[1].pop("tool_calls", [])
                        self.last = Result(**reply[1])
                        return
                    else:
                        finished = True
                        raise WorkerError(reply[1], reply[2])
            finally:
                if not finished and self.alive:  # the reader went away mid-answer: stop it and drain the pipe
                    self.stop()
                    while self._recv()[0] == "piece":
                        pass

    def stop(self) -> None:
        """Cancel the answer being generated (it ends after the current token)."""
        if self.alive:
            with self._send:
                self.conn.send(("stop",))

    def unload(self, timeout: float = 10.0) -> int:
        """Drop the model (its GPU memory is emptied: ``self.freed`` holds the worker's memory_info after that, with
        ``gpu_allocated`` on a GPU), then end the process; returns its RSS just before (bytes). All of its memory
        goes back to the system."""
        if self.proc is None:
            return 0
        before = self.rss()
        self.stop()
        self.freed = None
        idle = self._busy.acquire(timeout=2.0)  # an answer being stopped ends first; its reader drains the pipe
        try:
            with self._send:
                if idle:
                    self.conn.send(("unload",))
                self.conn.send(("exit",))
            if idle and self.conn.poll(timeout):
                reply = self.conn.recv()
                self.freed = reply[1] if reply[0] == "unloaded" else None
        except (OSError, ValueError, EOFError):
            pass
        finally:
            if idle:
                self._busy.release()
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()
        self.proc, self.conn, self.info = None, None, None
        self._release()
        return before
