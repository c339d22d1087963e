"""The chat model's own process: the web UI talks to it through a pipe and never imports torch for chat.

Parent side, :class:`InferenceWorker` (imports no torch): ``load`` starts a spawned process and
loads a model there, ``chat`` streams text pieces back, ``stop`` cancels the current answer, and
``unload`` ends the process, so every byte of its memory (and VRAM) goes back to the system.

Side by side, ``compare`` loads a right side next to the loaded (left) model as engine.serve.compare plans it, and
``uncompare`` drops it again; ``compare_chat`` then streams both answers at once, each piece tagged with its side.

Messages (tuples over a multiprocessing Pipe):
  parent -> worker: ("load", {model, adapters, quantization, template, device}), ("compare", {model, template}),
                    ("uncompare",), ("chat", messages, params, use_adapter, tools, sides), ("stop",), ("unload",),
                    ("exit",)
  worker -> parent: ("loaded", info) | ("compared", info) | ("piece", text, side) | ("done", {side: result})
                    | ("unloaded", info) | ("uncompared", info) | ("error", message, kind)

With a workspace, the worker reserves its device (the first visible GPU, or the CPU) in that workspace's
device queue from Load to Unload, so a run started meanwhile waits for it; a reservation whose process
died is stale and ignored.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from pathlib import Path
from typing import Iterator

import psutil

from engine.serve.sampling import (InferenceError, Result, SamplingParams, bytes_per_param, param_count, resolve_target,
                                   weights_bytes)


def rss_bytes(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def estimate_bytes(model: str, adapters: list[str], quantization: str, on_gpu: bool) -> int:
    """Memory the weights take once loaded (parameter count times the bytes of the load dtype or quantization)."""
    target = resolve_target(model, adapters)
    return int(param_count(target.base) * bytes_per_param(quantization, on_gpu)) + \
        sum(weights_bytes(a) for a in target.adapters)


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
    sides: dict = {}  # "left": the loaded ChatModel; "right": the side-by-side one (may be the left itself)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if msg[0] == "exit":
                return
            if msg[0] == "unload":
                device = sides["left"].device if "left" in sides else "cpu"
                _drop(sides, "right", "left")
                conn.send(("unloaded", memory_info(device)))
            elif msg[0] == "load":
                from engine.serve.inference import ChatModel, resolve_device

                spec = msg[1]
                _drop(sides, "right", "left")
                device = resolve_device(spec.get("device"))
                check_fits(estimate_bytes(spec["model"], spec.get("adapters") or [], spec.get("quantization", "none"),
                                          device.startswith("cuda")), device)
                chat = sides["left"] = ChatModel.load(spec["model"], adapters=spec.get("adapters"),
                                                      quantization=spec.get("quantization", "none"),
                                                      template=spec.get("template"), device=device)
                conn.send(("loaded", dict(memory_info(device), warnings=chat.warnings, template=chat.template.name,
                                          base=chat.target.base, adapters=chat.target.adapters,
                                          tokenizer_dir=chat.target.tokenizer_dir, quantization=chat.quantization,
                                          context_window=chat.context_window)))
            elif msg[0] == "compare":
                from engine.serve.compare import load_right

                _drop(sides, "right")
                conn.send(("compared", load_right(sides, msg[1])))
            elif msg[0] == "uncompare":
                device = sides["left"].device if "left" in sides else "cpu"
                _drop(sides, "right")
                conn.send(("uncompared", memory_info(device)))
            elif msg[0] == "chat":
                if "left" not in sides:
                    raise InferenceError("no model is loaded; press Load first")
                names = msg[5] if len(msg) > 5 else ["left"]
                if "right" in names and "right" not in sides:
                    raise InferenceError("nothing is loaded on the right; press Load right first")
                _stream(conn, [(n, sides[n]) for n in names], msg[1], SamplingParams(**msg[2]), msg[3], msg[4])
            elif msg[0] == "stop":
                continue  # a stop that arrived after its answer ended
        except InferenceError as err:
            conn.send(("error", str(err), err.kind))
        except Exception as err:  # noqa: BLE001 - the worker stays up and reports
            kind = "out_of_memory" if "out of memory" in str(err).lower() else "runtime"
            conn.send(("error", f"{type(err).__name__}: {err}", kind))


def _drop(sides: dict, *names: str) -> None:
    """Unload these sides (the right one first: it may hold adapters on the left's weights)."""
    for name in names:
        chat = sides.pop(name, None)
        if chat is not None and chat is not sides.get("left"):
            chat.unload()


def _stream(conn, sides: list, messages, params, use_adapter, tools=None) -> None:
    """Answer with every side at once, the same prompt, sampling and seed to each, their pieces sent as they come,
    tagged with their side; a stop ends every answer after its current token. Each answer repeats what its side
    answers alone: its sampling has a generator of its own, and sides on one model take turns per token with their
    own adapters (engine.serve.concurrent)."""
    from engine.serve.concurrent import merge

    convo = messages if isinstance(messages, dict) else {name: messages for name, _ in sides}
    for name, chat in sides:  # a conversation either side cannot take is refused before any answer starts
        try:
            chat.check(convo[name], tools)
        except InferenceError as err:
            raise InferenceError(f"{name} side: {err}" if len(sides) > 1 else str(err), err.kind) from None
    streams: dict = {}
    try:
        for name, chat in sides:
            streams[name] = chat.stream(convo[name], params, use_adapter=use_adapter, tools=tools)
    except BaseException:
        for stream in streams.values():
            stream.close()
        raise

    def stop_requested() -> bool:  # the parent holds the pipe while an answer runs: only stops come meanwhile
        stop = False
        while conn.poll():
            stop = conn.recv()[0] == "stop" or stop
        return stop

    for name, piece in merge(streams, stop_requested):
        conn.send(("piece", piece, name))
    results = {}
    for name, chat in sides:
        results[name] = done = streams[name].result.model_dump()
        if tools:
            done["tool_calls"] = chat.tool_calls(streams[name].result)[1]
    conn.send(("done", results))


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
        self.right: dict | None = None  # what the right side holds (the worker's "compared" info), while compared
        self.results: dict[str, Result] = {}  # each side's Result of the last answer
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
            self.info = self.right = None
            raise WorkerError(f"the chat worker died (exit code {code}); it may have run out of memory — load again",
                              "killed") from None

    def load(self, model: str, adapters: list[str] | None = None, quantization: str = "none",
             template: str | None = None, device: str | None = None) -> dict:
        """Load in the worker onto ``device`` (auto, cpu, cuda:N; auto is the first GPU, else the CPU)."""
        with self._busy:
            if not self.alive:
                self._start()
            self.info = self.right = None
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

    @property
    def left(self):
        """The loaded model as a Target (for planning the right side without the worker)."""
        from engine.serve.sampling import Target

        i = self.info
        return Target(base=i["base"], adapters=list(i["adapters"]), template=i["template"], tokenizer_dir=i.get("tokenizer_dir"))

    def plan(self, choice: str):
        """How ``choice`` would be served on the right of the loaded model, and what it costs (nothing loads)."""
        from engine.serve.compare import plan

        if not self.loaded:
            raise WorkerError("load a model on the left first; the right side is compared with it", "invalid_request")
        try:
            return plan(self.left, choice, self.info.get("quantization", "none"), self.info["device"].startswith("cuda"))
        except InferenceError as err:
            raise WorkerError(str(err), err.kind) from None

    def compare(self, model: str, template: str | None = None) -> dict:
        """Load ``model`` (a path, or engine.serve.compare.BASE_OF_LEFT) on the right; returns the worker's info."""
        if not self.loaded:
            raise WorkerError("load a model on the left first; the right side is compared with it", "invalid_request")
        with self._busy:
            self.right = None
            self.conn.send(("compare", dict(model=model, template=template)))
            reply = self._recv()
            if reply[0] == "error":
                raise WorkerError(reply[1], reply[2])
            self.right = reply[1]
            return self.right

    def uncompare(self) -> dict | None:
        """Drop the right side (a second model's memory goes back); the worker's memory_info after, None if none."""
        if not self.loaded or self.right is None:
            return None
        with self._busy:
            self.conn.send(("uncompare",))
            reply = self._recv()
            self.right = None
            return reply[1] if reply[0] == "uncompared" else None

    def chat(self, messages: list[dict], params: SamplingParams, use_adapter: bool = True,
             tools: list[dict] | None = None) -> Iterator[str]:
        """Yields text pieces; afterwards ``self.last`` holds the Result and ``self.last_calls`` the tool calls
        the answer makes (with ``tools``: the function schemas the model is shown)."""
        for _, piece in self._chat(messages, params, use_adapter, tools, ["left"]):
            yield piece

    def compare_chat(self, messages: list[dict] | dict[str, list[dict]], params: SamplingParams,
                     tools: list[dict] | None = None) -> Iterator[tuple[str, str]]:
        """Yields (side, piece) as the two answers are written at the same time, the same sampling and seed to both
        (each side answers as it does alone); afterwards ``self.results`` holds each side's Result. ``messages``: one
        conversation for both, or {"left": …, "right": …} when each side has its own earlier answers. ``stop`` ends
        both answers."""
        if self.loaded and self.right is None:
            raise WorkerError("nothing is loaded on the right; press Load right first", "invalid_request")
        yield from self._chat(messages, params, True, tools, ["left", "right"])

    def _chat(self, messages, params, use_adapter, tools, sides) -> Iterator[tuple[str, str]]:
        if not self.loaded:
            raise WorkerError("no model is loaded; press Load first", "invalid_request")
        with self._busy:
            self.last, self.last_calls, self.results = None, [], {}
            with self._send:
                self.conn.send(("chat", messages, params.model_dump(), use_adapter, tools, sides))
            finished = False
            try:
                while True:
                    reply = self._recv()
                    if reply[0] == "piece":
                        yield reply[2], reply[1]
                    elif reply[0] == "done":
                        finished = True
                        self.last_calls = reply[1]["left"].pop("tool_calls", [])
                        self.results = {side: Result(**{k: v for k, v in r.items() if k != "tool_calls"})
                                        for side, r in reply[1].items()}
                        self.last = self.results["left"]
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
        """Cancel the answer being generated (it ends after the current token; side by side, both answers end)."""
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
        self.proc, self.conn, self.info, self.right = None, None, None, None
        self._release()
        return before
