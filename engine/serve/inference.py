"""ChatModel: a base model plus zero or more LoRA adapters, generating with the training template.

``generate`` returns a whole answer, ``stream`` yields its text as it is produced (transformers'
TextIteratorStreamer, fed by ``generate`` on a thread, cancelled through a stop event). Both honour
the template's stop tokens, extra stop token ids and stop strings, which are cut from the answer.
The API server, the terminal chat and the web UI's worker process all call this one class.
Side-by-side chat loads a second ChatModel with ``share=``: on the same base it reuses the loaded weights
(:class:`Weights`, with each side's adapters as named peft adapters), so only a different base costs a second model.

Answers may be generated at the same time, on several threads, and a seed still repeats each one exactly
(engine.serve.concurrent: a generator of each request's own, and turns per forward step on shared weights).
"""

from __future__ import annotations

import gc
import logging
import re
import threading
from pathlib import Path
from typing import Iterator

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from engine.run.config import ModelConfig
from engine.data.templates import TemplateError, get_template
from engine.serve.concurrent import Weights, sampler
from engine.serve.sampling import (InferenceError, Result, SamplingParams, check_messages, model_shape, parse_tool_calls,
                                   resolve_target)

log = logging.getLogger("engine.serve.inference")


def resolve_device(device: str | None = None) -> str:
    """'cpu' or 'cuda:N' for a device option: auto (or nothing) is the first GPU when there is one, else the CPU;
    cuda means cuda:0, and a bare number N means cuda:N. A GPU this machine does not have is refused."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    match = re.fullmatch(r"cuda(?::(\d+))?|(\d+)", name)
    if not match:
        raise InferenceError(f"device: '{device}' is not a device; use auto, cpu, cuda or cuda:N")
    index = int(match.group(1) or match.group(2) or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        have = ", ".join(f"cuda:{i}" for i in range(count)) or "none, only the CPU"
        raise InferenceError(f"device: {device} is not on this machine (GPUs: {have})")
    return f"cuda:{index}"


class _Penalties(LogitsProcessor):
    """OpenAI frequency and presence penalties over the tokens generated so far."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.start, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        gen = input_ids[:, self.start:]
        if gen.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, gen, torch.ones_like(gen, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class _StopOn(StoppingCriteria):
    """Stops on a stop string in the generated text, or when the stop event is set."""

    def __init__(self, tokenizer, prompt_len: int, words: list[str], event: threading.Event | None):
        self.tokenizer, self.start, self.words, self.event = tokenizer, prompt_len, words, event
        self.tail = max((len(tokenizer.encode(w, add_special_tokens=False)) for w in words), default=0) + 2

    def __call__(self, input_ids, scores, **kwargs):
        if self.event is not None and self.event.is_set():
            return True
        if not self.words:
            return False
        text = self.tokenizer.decode(input_ids[0, max(self.start, input_ids.shape[1] - self.tail):], skip_special_tokens=False)
        return any(w in text for w in self.words)


def cut_at_stop(text: str, words: list[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    hits = [text.find(w) for w in words if w and w in text]
    return (text[: min(hits)], True) if hits else (text, False)


def _held_back(text: str, words: list[str]) -> int:
    """How many trailing characters might be the start of a stop string (so a stream waits for them)."""
    keep = 0
    for w in words:
        for n in range(min(len(w) - 1, len(text)), 0, -1):
            if text.endswith(w[:n]):
                keep = max(keep, n)
                break
    return keep


class ChatModel:
    def __init__(self):
        self.tokenizer = self.template = None
        self.weights: Weights | None = None
        self.adapter_names: list[str] = []
        self.target = None
        self.device = "cpu"
        self.quantization = "none"
        self.warnings: list[str] = []

    @property
    def model(self):
        return self.weights.model if self.weights is not None else None

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, model_path: str, adapters: list[str] | None = None, quantization: str = "none",
             template: str | None = None, dtype: str = "auto", device: str | None = None,
             share: "ChatModel | None" = None, prefix: str = "a") -> "ChatModel":
        """Load onto ``device`` (see :func:`resolve_device`; checked before any weights load)."""
        return cls.from_target(resolve_target(model_path, adapters), quantization, template, dtype, device, share, prefix)

    @classmethod
    def from_target(cls, target, quantization: str = "none", template: str | None = None, dtype: str = "auto",
                    device: str | None = None, share: "ChatModel | None" = None, prefix: str = "a") -> "ChatModel":
        """Load a resolved Target. With ``share`` (a loaded ChatModel on the same base, device, quantization and
        vocabulary), its weights are reused and this side's adapters join them under names starting with ``prefix``."""
        from engine.run.checkpoint import fit_base
        from engine.train.model_setup import load_base_model, load_tokenizer, resolve_dtype

        self = cls()
        self.device = resolve_device(device)
        self.target, self.quantization = target, quantization
        cfg = ModelConfig(path=target.base, quantization=quantization, dtype=dtype)
        self.tokenizer = load_tokenizer(cfg.model_copy(update={"path": target.tokenizer_dir or target.base}))
        self.tokenizer.padding_side = "left"
        saved = target.template
        name = template or saved or "auto"
        if template and saved and template != saved:
            self.warnings.append(f"template '{template}' overrides '{saved}', the template this checkpoint was trained "
                                 "with; answers may come out in the wrong format")
        try:
            self.template = get_template(name, self.tokenizer)
        except TemplateError as err:
            raise InferenceError(f"model.template: {err.message}") from None
        base_shape = model_shape(target.base)
        for adapter in target.adapters:
            self._check_adapter(adapter, base_shape)
        key = (str(Path(target.base).resolve()), quantization, dtype, self.device, len(self.tokenizer))
        if share is not None and share.weights is not None and share.weights.key == key:
            self.weights = share.weights
        else:
            model = load_base_model(cfg, resolve_dtype(cfg), device_map={"": self.device}, attn="sdpa")
            if target.adapters:
                fit_base(model, self.tokenizer)  # a vocabulary-extended adapter needs the base grown to its tokenizer
            model.eval()
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id
            self.weights = Weights(model, key)
        self.weights.users += 1
        # several adapters of one side act together: Weights.generate switches them all on for its answers
        self.adapter_names = [self.weights.attach(a, f"{prefix}{i}") for i, a in enumerate(target.adapters)]
        for w in self.warnings:
            log.warning(w)
        return self

    @property
    def shares_weights(self) -> bool:
        return self.weights is not None and self.weights.users > 1

    def unload(self) -> int:
        """Drop this side (its adapters only, when another side shares its base) and give the GPU memory back to the
        driver; returns the bytes still allocated on its GPU."""
        if self.weights is not None:
            self.weights.users -= 1
            if self.weights.users > 0:
                self.weights.detach(self.adapter_names)
            else:
                self.weights.close()
        self.weights, self.adapter_names = None, []
        gc.collect()
        if not self.device.startswith("cuda"):
            return 0
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(self.device)

    @staticmethod
    def _check_adapter(adapter: str, base_shape: dict) -> None:
        from engine.run.checkpoint import declared_base

        declared = declared_base(Path(adapter))
        if not declared or not declared.exists():
            return
        theirs = model_shape(declared)
        diff = {k: (theirs[k], base_shape.get(k)) for k in theirs if k in base_shape and theirs[k] != base_shape[k]}
        if diff:
            what = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
            raise InferenceError(f"adapter {adapter} was trained on {declared}, which does not match this base model "
                                 f"({what})")

    @property
    def has_adapter(self) -> bool:
        return bool(self.adapter_names)

    def tool_calls(self, result: Result) -> tuple[str, list[dict]]:
        """(text, tool calls) of an answer: the calls it writes in its template's tool format, and the text
        around them. Special tokens other than the stop tokens are kept, as a tool format may use them
        (Qwen2.5's <tool_call> is one)."""
        text, calls = parse_tool_calls(result.text)
        if calls or not result.token_ids:
            return text, calls
        stops = set(self.stop_token_ids()) | {self.tokenizer.pad_token_id}
        raw = self.tokenizer.decode([t for t in result.token_ids if t not in stops], skip_special_tokens=False)
        text2, calls = parse_tool_calls(raw)
        return (text2, calls) if calls else (text, [])

    def stop_token_ids(self) -> list[int]:
        """The template's stop tokens, then the model's own end tokens (generation_config.json's eos_token_id, a
        list for Qwen2, Llama 3 and Gemma instruct models: Qwen's <|endoftext|> next to <|im_end|>), which an
        explicit eos_token_id given to generate would otherwise replace."""
        own = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        own = [own] if isinstance(own, int) else list(own or [])
        return list(dict.fromkeys(self.template.stop_token_ids(self.tokenizer) + own))

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)

    # ------------------------------------------------------------ generation

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        messages = check_messages(messages)
        try:
            text = self.template.render_generation_prompt(messages, tools) if tools else \
                self.template.render_generation_prompt(messages)
        except TemplateError as err:
            raise InferenceError(err.message) from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt's token ids, or an InferenceError for a bad conversation or one too long for the model.
        ``tools``: the schemas the model may call (OpenAI {"type": "function", "function": {...}} objects)."""
        ids = self.prompt_ids(messages, tools)
        window = self.context_window
        if len(ids) >= window:
            raise InferenceError(f"the prompt is {len(ids)} tokens, {len(ids) - window + 1} more than the model's "
                                 f"context window of {window} leaves room for (shorten the conversation or clear it)",
                                 "context_length")
        return ids

    def _setup(self, messages, params: SamplingParams, event, streamer=None, tools=None):
        ids = self.check(messages, tools)
        window = self.context_window
        max_new = min(params.max_new_tokens, window - len(ids))
        eos = list(dict.fromkeys(self.stop_token_ids() + list(params.stop_token_ids)))
        words = [w for w in params.stop] + [w for w in self.template.stop_words
                                            if self.tokenizer.convert_tokens_to_ids(w) not in eos]
        # sampling is transformers' greedy search over scores where the seeded draw (sampler) left one token
        kwargs = dict(max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None, top_k=None,
                      eos_token_id=eos or None, pad_token_id=self.tokenizer.pad_token_id,
                      repetition_penalty=params.repetition_penalty, streamer=streamer)
        device = next(self.model.parameters()).device
        processors = LogitsProcessorList()
        if params.frequency_penalty or params.presence_penalty:
            processors.append(_Penalties(len(ids), params.frequency_penalty, params.presence_penalty))
        if params.temperature > 0:
            processors.extend(sampler(params, device))
        input_ids = torch.tensor([ids], device=device)
        kwargs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), logits_processor=processors,
                      stopping_criteria=StoppingCriteriaList([_StopOn(self.tokenizer, len(ids), words, event)]))
        return ids, eos, words, kwargs

    def _run(self, kwargs, use_adapter: bool):
        """Generate with this side's adapters on (or none: the side has none here, or asks for the base)."""
        with torch.inference_mode():
            return self.weights.generate(kwargs, self.adapter_names if use_adapter else ())

    def generate(self, messages: list[dict], params: SamplingParams | None = None, use_adapter: bool = True,
                 tools: list[dict] | None = None) -> Result:
        params = params or SamplingParams()
        ids, eos, words, kwargs = self._setup(messages, params, None, tools=tools)
        out = self._run(kwargs, use_adapter)[0, len(ids):].tolist()
        text, hit = cut_at_stop(self.tokenizer.decode(out, skip_special_tokens=True), words)
        stopped = hit or (bool(out) and out[-1] in eos)
        return Result(text=text, prompt_tokens=len(ids), completion_tokens=len(out),
                      finish_reason="stop" if stopped else "length", token_ids=out)

    def stream(self, messages: list[dict], params: SamplingParams | None = None, use_adapter: bool = True,
               stop_event: threading.Event | None = None, tools: list[dict] | None = None) -> "Stream":
        """An iterator of text pieces; its ``result`` is set once it is exhausted. Closing it early,
        or setting ``stop_event``, stops generation after the current token."""
        params = params or SamplingParams()
        event = stop_event or threading.Event()
        streamer = _CountingStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        ids, eos, words, kwargs = self._setup(messages, params, event, streamer, tools)
        return Stream(self, kwargs, use_adapter, streamer, event, ids, eos, words)


class _CountingStreamer(TextIteratorStreamer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens: list[int] = []
        self.error: BaseException | None = None

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.tokens.extend(value.reshape(-1).tolist())
        super().put(value)


class Stream:
    def __init__(self, chat: ChatModel, kwargs, use_adapter, streamer, event, ids, eos, words):
        self.streamer, self.event, self.eos, self.words, self.prompt_len = streamer, event, eos, words, len(ids)
        self.result: Result | None = None

        def work():
            try:
                chat._run(kwargs, use_adapter)
            except BaseException as err:  # noqa: BLE001 - handed to the reader
                streamer.error = err
                streamer.end()

        self.thread = threading.Thread(target=work, daemon=True, name="chat-generate")
        self.thread.start()
        self._gen = self._pieces()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self.event.set()
        self._gen.close()

    def _pieces(self) -> Iterator[str]:
        sent, text, hit, cancelled = 0, "", False, False
        try:
            for piece in self.streamer:
                text += piece
                cut, hit = cut_at_stop(text, self.words)
                if hit:
                    break
                safe = len(cut) - _held_back(cut, self.words)
                if safe > sent:
                    yield cut[sent:safe]
                    sent = safe
            cancelled = self.event.is_set() and not hit
        finally:
            self.event.set()
            self.thread.join()
        if self.streamer.error is not None:
            raise self.streamer.error
        cut = cut_at_stop(text, self.words)[0]
        if len(cut) > sent:
            yield cut[sent:]
        toks = self.streamer.tokens
        stopped = hit or (bool(toks) and toks[-1] in self.eos)
        reason = "stop" if stopped else "cancelled" if cancelled else "length"
        self.result = Result(text=cut, prompt_tokens=self.prompt_len, completion_tokens=len(toks), finish_reason=reason,
                             token_ids=toks)

    def cancel(self) -> None:
        """Stop generation after the current token (the stream then ends with finish_reason 'cancelled')."""
        self.event.set()
