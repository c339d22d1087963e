"""An OpenAI-compatible chat API over one ChatModel: GET /v1/models, POST /v1/chat/completions.

Tool use follows OpenAI's shape: ``tools`` (function schemas) and ``tool_choice`` in, assistant
``tool_calls`` out (finish_reason ``tool_calls``), then ``role: tool`` results in the next request.
The template shows the schemas and the results to the model and the calls it writes are parsed
back. ``tool_choice`` "none" hides the tools; a named function shows only that one; "required"
cannot force a call (the answer comes back as text when the model writes none). A streamed answer
with tools is sent when it is complete, as content or as tool_calls chunks, because whether it is
a call is known only at its end.

``create_app(chat_model, api_key=None)`` builds the FastAPI app (tests run it with uvicorn on a
loopback port); ``serve`` is what ``workbench api`` calls. Errors come back in OpenAI's shape
({"error": {"message", "type", "code"}}) and never take the server down.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from engine.serve.sampling import InferenceError, SamplingParams

_STATUS = {"invalid_request": 400, "context_length": 400, "not_found": 404, "out_of_memory": 503}


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list | None = ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, logprobs=False, ...) are ignored

    model: str | None = None
    messages: list[Message]
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0)
    seed: int | None = None
    stream: bool = False
    stop_token_ids: list[int] = Field(default_factory=list, description="extension: token ids that end the answer")
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None

    def tool_schemas(self) -> list[dict] | None:
        """The schemas shown to the model (None: no tools, or tool_choice 'none')."""
        from engine.data.errors import DataError
        from engine.data.tools import parse_tools

        choice = self.tool_choice
        if not self.tools or choice == "none":
            return None
        try:
            tools = parse_tools(self.tools, "tools")
        except DataError as err:
            raise InferenceError(err.message.replace("field 'tools'", "tools", 1)) from None
        if isinstance(choice, dict):
            wanted = (choice.get("function") or {}).get("name")
            tools = [t for t in tools if t["function"]["name"] == wanted]
            if not tools:
                raise InferenceError(f"tool_choice names function {wanted!r}, which is not among the tools")
        elif choice not in (None, "auto", "required"):
            raise InferenceError(f"tool_choice must be none, auto, required or a function, not {choice!r}")
        return tools

    def params(self, default_max: int) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is not None and max_tokens <= 0:
            raise InferenceError(f"max_tokens must be at least 1, got {max_tokens}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                  max_new_tokens=max_tokens or default_max, repetition_penalty=self.repetition_penalty,
                                  frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                                  stop=stop, stop_token_ids=self.stop_token_ids, seed=self.seed)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(map(str, first["loc"])).replace("max_new_tokens", "max_tokens")  # the field the client sent
            raise InferenceError(f"{where}: {first['msg']}") from None


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def create_app(chat_model, api_key: str | None = None, model_name: str | None = None, default_max_tokens: int = 512) -> FastAPI:
    app = FastAPI(title="Workbench OpenAI-compatible API")
    name = model_name or "workbench"
    created = int(time.time())
    gate = threading.Lock()  # one generation at a time on the one model; others wait their turn

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not given or not secrets.compare_digest(given, api_key):
                return _error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                              "authentication_error", "invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return _error(400, f"{where}: {first['msg']}" if where else first["msg"])

    @app.exception_handler(InferenceError)
    async def inference_error(request, err: InferenceError):
        return _error(_STATUS.get(err.kind, 400), str(err), "invalid_request_error", err.kind)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "workbench"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if req.model and req.model != name:  # as OpenAI: an unknown model is not found, not silently replaced
            raise InferenceError(f"The model '{req.model}' does not exist here; this server serves '{name}'", "not_found")
        params = req.params(default_max_tokens)
        tools = req.tool_schemas()
        messages = [m.model_dump() for m in req.messages]
        chat_model.check(messages, tools)  # bad roles, empty lists, over-long prompts fail here, before streaming
        cid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            usage = bool(((req.model_extra or {}).get("stream_options") or {}).get("include_usage"))
            return EventSourceResponse(_chunks(chat_model, gate, messages, params, req.n, cid, now, name, usage, tools),
                                       ping=15, sep="\n")
        results = await run_in_threadpool(_complete, chat_model, gate, messages, params, req.n, tools)
        choices = []
        for i, r in enumerate(results):
            message, finish = _answer(chat_model, r, tools)
            choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": None})
        return {"id": cid, "object": "chat.completion", "created": now, "model": name, "choices": choices,
                "usage": _usage(results)}

    return app


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    return params if params.seed is None or i == 0 else params.model_copy(update={"seed": params.seed + i})


def _complete(chat_model, gate, messages, params, n, tools=None):
    with gate:
        return [chat_model.generate(messages, _seeded(params, i), tools=tools) for i in range(n)]


def _answer(chat_model, result, tools) -> tuple[dict, str]:
    """(OpenAI assistant message, finish_reason) of a result; with tools, the calls it writes become tool_calls."""
    text, calls = chat_model.tool_calls(result) if tools else (result.text, [])
    if not calls:
        return {"role": "assistant", "content": result.text}, result.finish_reason
    return {"role": "assistant", "content": text or None,
            "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                           for c in calls]}, "tool_calls"


def _usage(results) -> dict:
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunks(chat_model, gate, messages, params, n, cid, created, name, include_usage, tools=None):
    """SSE data lines of a streamed completion (a sync generator: sse-starlette runs it in a thread)."""
    def chunk(i, delta, finish=None, usage=None):
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [] if i is None else [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            body["usage"] = usage
        return json.dumps(body, ensure_ascii=False)

    results = []
    with gate:
        for i in range(n):
            stream = chat_model.stream(messages, _seeded(params, i), tools=tools)
            yield chunk(i, {"role": "assistant", "content": ""})
            try:
                pieces = []
                for piece in stream:
                    if tools:  # held back: a call is known only at the end
                        pieces.append(piece)
                    else:
                        yield chunk(i, {"content": piece})
            except GeneratorExit:  # the client went away: stop generating
                stream.close()
                raise
            results.append(stream.result)
            finish = stream.result.finish_reason
            if tools:
                message, finish = _answer(chat_model, stream.result, tools)
                for k, call in enumerate(message.get("tool_calls") or []):
                    yield chunk(i, {"tool_calls": [dict(call, index=k)]})
                if message["content"]:
                    yield chunk(i, {"content": message["content"]})
            yield chunk(i, {}, finish)
    if include_usage:  # as OpenAI does with stream_options={"include_usage": true}: a last chunk with no choices
        yield chunk(None, None, usage=_usage(results))
    yield "[DONE]"


def serve(model: str, adapters: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, quantization: str = "none", template: str | None = None,
          model_name: str | None = None, default_max_tokens: int = 512, device: str | None = None) -> int:
    import uvicorn

    from engine.serve.inference import ChatModel

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model")
    chat_model = ChatModel.load(model, adapters=adapters, quantization=quantization, template=template, device=device)
    for w in chat_model.warnings:
        print(f"warning: {w}")
    name = model_name or (chat_model.target.adapters[-1] if chat_model.target.adapters else chat_model.target.base)
    print(f"serving {name} at http://{host}:{port}/v1 (OpenAI-compatible)", flush=True)
    uvicorn.run(create_app(chat_model, api_key=api_key, model_name=name, default_max_tokens=default_max_tokens), host=host, port=port, log_level="info")
    return 0

