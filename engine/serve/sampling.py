"""What a chat request is, shared by the engine, the worker, the API server and the CLI.

``SamplingParams`` is the one declaration of the sampling controls (bounds, defaults and help),
``check_messages`` the one validation of a conversation, and ``resolve_target`` turns a path (a run,
a checkpoint, a merged export or a plain model) and extra adapters into a base model, its adapters
and the template it was trained with, through the one checkpoint resolver (engine.run.checkpoint). This module imports no torch, so the web UI
can use it without loading the inference stack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.data.tools import parse_tool_calls  # noqa: F401  (the serving side reads calls back with it)
from engine.run.checkpoint import ADAPTER_CONFIG, CheckpointError, resolve, safetensors_params

ROLES = ("system", "user", "assistant", "tool")


class InferenceError(ValueError):
    """A request or a load that cannot be served; the message is meant for the user."""

    def __init__(self, message: str, kind: str = "invalid_request"):
        self.kind = kind  # invalid_request | not_found | context_length | out_of_memory
        super().__init__(message)


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature; 0 = greedy (always the most likely token).")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens whose probability adds up to top_p.")
    top_k: int = Field(50, ge=0, le=1000, description="Keep only the k most likely tokens (0 = no limit).")
    max_new_tokens: int = Field(512, ge=1, le=131072, description="Most tokens to generate for one answer.")
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0, description="Divide the score of tokens already in the text (1 = off).")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI-style: subtract this times a token's count in the answer.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI-style: subtract this once from every token already in the answer.")
    stop: list[str] = Field(default_factory=list, description="Strings that end the answer (not included in it).")
    stop_token_ids: list[int] = Field(default_factory=list, description="Token ids that end the answer, next to the template's own.")
    seed: int | None = Field(None, description="Seed for sampling, for repeatable answers.")


class Result(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length", "cancelled"]
    token_ids: list[int] = Field(default_factory=list, exclude=True)


def check_messages(messages) -> list[dict]:
    """Plain {role, content} dicts (an assistant message that called tools keeps its ``tool_calls``, arguments
    parsed), or an InferenceError naming the first bad message."""
    from engine.data.errors import DataError
    from engine.data.formats import check_chat
    from engine.data.tools import tool_call

    if not isinstance(messages, list) or not messages:
        raise InferenceError("the message list is empty; send at least one user message")
    out = []
    for i, m in enumerate(messages):
        get = m.get if isinstance(m, dict) else lambda key, _m=m: getattr(_m, key, None)
        role, content, calls = get("role"), get("content"), get("tool_calls")
        if role not in ROLES:
            raise InferenceError(f"messages[{i}]: role {role!r} is not known to the chat template (use one of {', '.join(ROLES)})")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise InferenceError(f"messages[{i}]: content must be text")
        message = {"role": role, "content": content}
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise InferenceError(f"messages[{i}]: tool_calls must be a list, on an assistant message")
            where = f"messages[{i}].tool_calls"
            try:
                message["tool_calls"] = [tool_call(c, where) for c in calls]
            except DataError as err:
                raise InferenceError(err.message.replace(f"field '{where}'", where, 1)) from None
        out.append(message)
    if out[-1]["role"] not in ("user", "tool"):
        raise InferenceError(f"the last message must come from the user (or be a tool result), not the {out[-1]['role']}")
    try:
        check_chat(out, "messages", end=None)
    except DataError as err:
        raise InferenceError(err.message.replace("field 'messages', ", "", 1)) from None
    return out


# ---------------------------------------------------------------- what to load

@dataclass
class Target:
    """A resolved model: the base weights, the adapters on top, and the training template (if known)."""

    base: str
    adapters: list[str] = field(default_factory=list)
    template: str | None = None  # from the checkpoint's config.yaml
    tokenizer_dir: str | None = None  # where the tokenizer (and its saved chat template) lives


def resolve_target(model: str, adapters: list[str] | None = None) -> Target:
    """Turn ``--model`` (+ ``--adapter``) into a Target through the checkpoint resolver. ``model`` may be a plain
    model, a merged export, a run directory (its final/ or newest checkpoint), a checkpoint or a bare adapter."""
    if not Path(model).exists():
        raise InferenceError(f"model not found: {model}", "not_found")
    adapters = [str(a) for a in (adapters or [])]
    for a in adapters:
        if not (Path(a) / ADAPTER_CONFIG).is_file():
            raise InferenceError(f"adapter not found: {a} (a LoRA checkpoint holds {ADAPTER_CONFIG})", "not_found")
    try:
        main = resolve(model, run_means_latest=True, field="")
        extra = [resolve(a, base=main.base or main.path, field="") for a in adapters]
    except CheckpointError as err:
        if err.field == "model.base":
            raise InferenceError(f"the base model of adapter {model} is not on this machine ({err}); pass the base "
                                 "with --model and the adapter with --adapter", "not_found") from None
        raise InferenceError(str(err), "invalid_request" if "reward model" in str(err) else "not_found") from None
    if main.kind == "adapter":
        return Target(base=str(main.base), adapters=[str(main.path), *adapters], template=main.template,
                      tokenizer_dir=str(main.tokenizer_dir) if main.tokenizer_dir else None)
    first = extra[0] if extra and not main.template else None  # a plain base with explicit adapters: the adapter's run knows the template
    tokenizer_dir = (first.tokenizer_dir if first else None) or main.tokenizer_dir or main.path
    return Target(base=str(main.path), adapters=adapters, template=first.template if first else main.template,
                  tokenizer_dir=str(tokenizer_dir))


def model_shape(path: str | Path) -> dict:
    """The fields of config.json that must match between an adapter's base and the model it is put on."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
    return {k: cfg.get(k) for k in keys if k in cfg}


def weights_bytes(path: str | Path) -> int:
    """Size of a model directory's weight files (to check memory before a load)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) or \
        sum(p.stat().st_size for p in Path(path).glob("*.bin"))


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def param_count(path: str | Path) -> int:
    """Parameters of a model directory: counted from its safetensors headers, else (.bin weights) the size of its
    weight files over the bytes of the dtype config.json says they are stored in."""
    counted = safetensors_params(Path(path))
    if counted:
        return counted[0]
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    stored = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return int(weights_bytes(path) / _DTYPE_BYTES.get(stored, 4))


def bytes_per_param(quantization: str, on_gpu: bool) -> float:
    """Memory of one parameter once loaded: dtype auto loads bfloat16 (2 bytes) on a GPU and float32 (4) on the CPU;
    4-bit quantization takes about 0.56 bytes, 8-bit about 1.1."""
    return {"nf4": 0.56, "fp4": 0.56, "int8": 1.1}.get(quantization, 2 if on_gpu else 4)
