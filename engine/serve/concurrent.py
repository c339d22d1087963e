"""Several answers generated at the same time in one process, each exactly as it is made alone.

- ``sampler``: sampling that draws from the request's own ``torch.Generator`` (transformers' warpers, then
  :class:`_Draw`), so a seed repeats an answer whatever else the process generates meanwhile; torch's one global
  generator is never used.
- :class:`Weights`: one loaded model that several chat sides (and answers) share; its forward steps take turns,
  each run with the adapters of the answer it belongs to.
- ``merge``: several text streams read at once, their pieces yielded as they come, tagged by name.

Side-by-side chat (engine.serve.worker) uses all three to write both columns together.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from engine.serve.sampling import InferenceError, SamplingParams


class _Draw(LogitsProcessor):
    """The last processor when sampling: draws the next token from the processed distribution (after the penalties,
    temperature, top-k and top-p) with the request's own generator, and leaves that token the only finite score, so
    generate's greedy pick takes it. torch's global generator is never used, so a seed repeats an answer whatever
    else the process generates meanwhile (transformers 5's generate takes no generator of its own)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids, scores):
        pick = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, pick, 0.0)


def sampler(params: SamplingParams, device) -> list[LogitsProcessor]:
    """transformers' own warpers, in the order its sampling applies them, then the seeded draw."""
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    warpers: list[LogitsProcessor] = []
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return [*warpers, _Draw(generator)]


class Weights:
    """One loaded model, shared by the chat sides that stand on the same base: each side's adapters are named peft
    adapters on it (a side with none answers with them switched off).

    Several answers may be generated on it at once, one per thread (:meth:`generate`). peft's active adapter is
    state of the whole model, so the model's forward holds ``lock``: every step (prefill or one new token) runs
    alone, after switching the model to the adapters of the thread that runs it. The sides then take turns token
    by token, and each step computes exactly what it computes when that side answers alone."""

    def __init__(self, model, key: tuple):
        self.model, self.key, self.users, self.lock = model, key, 0, threading.Lock()
        self.inner = model  # the transformers model itself: peft injects its layers into it and never replaces it
        self._local = threading.local()  # per thread: the adapters of the answer it generates
        self._active: tuple | None = None  # the adapters the model is switched to (None: unknown, after a change)
        self._hooks = [model.register_forward_pre_hook(self._enter),
                       model.register_forward_hook(self._leave, always_call=True)]

    def generate(self, kwargs: dict, adapters: tuple):
        """``inner.generate(**kwargs)`` with ``adapters`` (peft adapter names; () for none, or switched off) on for
        each of its forward steps. The inner model generates, not peft's wrapper, whose generate swaps methods on
        the shared model while it runs (LoRA-style adapters live in the inner model's layers, so it is the same)."""
        self._local.adapters = tuple(adapters)
        try:
            return self.inner.generate(**kwargs)
        finally:
            self._local.adapters = None

    def _enter(self, module, args):
        self.lock.acquire()
        self._local.held = True
        want = getattr(self._local, "adapters", None)
        if want is not None and want != self._active and hasattr(self.model, "peft_config"):
            self._active = None
            tuner = self.model.base_model
            if want:
                tuner.enable_adapter_layers()
                tuner.set_adapter(list(want), inference_mode=True)
            else:
                tuner.disable_adapter_layers()
            self._active = want

    def _leave(self, module, args, output):
        if getattr(self._local, "held", False):
            self._local.held = False
            self.lock.release()

    def attach(self, adapter: str, name: str) -> str:
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(adapter)
        if config.is_prompt_learning:  # its virtual tokens live in peft's wrapper, which answers here never go through
            raise InferenceError(f"adapter {adapter} is a {config.peft_type.value} adapter; chat serves LoRA-style "
                                 "adapters (LoRA, QLoRA, ...) only")
        with self.lock:
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(adapter, adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, adapter, adapter_name=name)
            except RuntimeError as err:  # size mismatch in a state dict: the adapter belongs to another base
                raise InferenceError(f"adapter {adapter} does not fit base model {self.key[0]}: "
                                     f"{str(err).splitlines()[-1].strip()}") from None
            finally:
                self._active = None
            self.model.eval()
        return name

    def detach(self, names: list[str]) -> None:
        """Drop these named adapters; the plain base comes back when none is left."""
        if not names:
            return
        with self.lock:
            self._active = None
            if not set(self.model.peft_config) - set(names):
                self.model = self.model.unload()
                return
            for name in names:
                self.model.delete_adapter(name)

    def close(self) -> None:
        """Take the step hooks off the model (its last user is gone)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def merge(streams: dict, stop_requested: Callable[[], bool], poll: float = 0.05) -> Iterator[tuple[str, str]]:
    """(name, piece) from every stream of ``streams`` (name -> Stream) as they come, each read on a thread of its own,
    until all have ended. ``stop_requested`` is asked every ``poll`` seconds at most; when it says yes, every stream is
    cancelled (it ends after its current token). A stream that fails cancels the others; its error is raised once
    every stream has ended."""
    pieces: queue.Queue = queue.Queue()

    def pump(name: str, stream) -> None:
        try:
            for piece in stream:
                pieces.put((name, piece, None))
            pieces.put((name, None, None))
        except BaseException as err:  # noqa: BLE001 - raised by the reader, after every stream has ended
            pieces.put((name, None, err))

    readers = [threading.Thread(target=pump, args=item, daemon=True, name=f"read-{item[0]}") for item in streams.items()]
    for reader in readers:
        reader.start()
    running, error = len(readers), None
    try:
        while running:
            if stop_requested():
                for stream in streams.values():
                    stream.cancel()
            try:
                name, piece, err = pieces.get(timeout=poll)
            except queue.Empty:
                continue
            if piece is not None:
                yield name, piece
                continue
            running -= 1
            if err is not None and error is None:
                error = err
                for stream in streams.values():
                    stream.cancel()
    finally:  # also when whoever reads this generator goes away early
        if running:
            for stream in streams.values():
                stream.cancel()
        for reader in readers:
            reader.join()
    if error is not None:
        raise error
