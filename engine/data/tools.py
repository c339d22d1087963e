"""Tool calling: the one home of what a tool call is (a function name and JSON-object arguments), how the
files people write hold calls and schemas, how a template's tool support is probed, and how a generated
answer's calls are read back. Imports no torch.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import DataError

_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
PROBE_USER, PROBE_ANSWER = "PROBE-USER-7f3a", "PROBE-ANSWER-7f3a"


def has_tools(messages: list[dict]) -> bool:
    """Whether a conversation calls tools or holds tool results."""
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def tool_call(value: Any, field: str, where: str = "") -> dict:
    """One call as ``{"type": "function", "function": {"name", "arguments": dict}}``, from the shapes files
    use: ``{"name", "arguments"}`` (arguments an object or its JSON string; ``parameters`` as Llama 3 writes
    it) or OpenAI's ``{"id", "type": "function", "function": {...}}``."""
    where = f", {where}" if where else ""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        raise DataError(f"field '{field}'{where}: a tool call must be an object with a name and arguments, "
                        'e.g. {"name": "get_weather", "arguments": {"city": "Paris"}}', field=field)
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise DataError(f"field '{field}'{where}: the arguments of tool call '{value['name']}' are not valid JSON "
                            f"({err.msg})", field=field) from None
    if not isinstance(args, dict):
        raise DataError(f"field '{field}'{where}: the arguments of tool call '{value['name']}' must be a JSON object",
                        field=field)
    return {"type": "function", "function": {"name": value["name"], "arguments": args}}


def parse_tools(value: Any, field: str) -> list[dict]:
    """The tool schemas of a conversation, as OpenAI ``{"type": "function", "function": {...}}`` objects, from a
    list (or its JSON string, as the glaive function-calling sets store it) of such objects or of bare
    ``{name, description, parameters}`` schemas."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"field '{field}' is not valid JSON ({err.msg} at column {err.colno}); it must be a list "
                            "of function schemas", field=field) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"field '{field}' must be a list of function schemas, found {type(value).__name__}", field=field)
    out = []
    for i, tool in enumerate(value, 1):
        fn = tool.get("function") if isinstance(tool, dict) and isinstance(tool.get("function"), dict) else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise DataError(f"field '{field}', tool {i}: a function schema needs a name (with a description and "
                            "parameters)", field=field)
        out.append({"type": "function", "function": fn})
    return out


def uses_tools(messages: list[dict], tools) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def call_json(call: dict) -> tuple[str, str]:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    return fn["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_7f3a", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}
_PROBE_CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "probe_call_7f3a", "arguments": {"x": 1}}}]}


def probe_tool_support(tokenizer) -> str | None:
    """None when the tokenizer's chat template shows tool schemas, tool calls and tool results; else why not."""
    user = {"role": "user", "content": PROBE_USER}
    try:
        schemas = tokenizer.apply_chat_template([user], tools=[_PROBE_TOOL], tokenize=False)
        turns = tokenizer.apply_chat_template([user, _PROBE_CALL, {"role": "tool", "content": PROBE_ANSWER}],
                                              tokenize=False)
    except Exception as err:  # a template may raise on any role or key it does not know
        return f"it fails on tools: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    missing = [what for what, token, text in (("the tool schemas", "probe_tool_7f3a", schemas),
                                             ("tool calls", "probe_call_7f3a", turns),
                                             ("tool results", PROBE_ANSWER, turns)) if token not in text]
    return f"it leaves out {', '.join(missing)}" if missing else None


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(text without the calls, calls) of a generated answer. A call is written as the registry's tool formats
    write it: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Qwen2.5, ChatML), or the
    whole answer as ``{"name": ..., "parameters"|"arguments": {...}}`` (Llama 3.1), one such object a line.
    Each call comes back as ``{"name": str, "arguments": dict}``; text that is not a valid call stays text."""
    def call(raw: str) -> dict | None:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        args = value.get("arguments", value.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        return {"name": value["name"], "arguments": args} if isinstance(args, dict) else None

    blocks = [(m, call(m.group(1))) for m in _CALL_BLOCK.finditer(text)]
    if blocks and all(c is not None for _, c in blocks):
        return _CALL_BLOCK.sub("", text).strip(), [c for _, c in blocks]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    calls = [call(line) for line in lines]
    if lines and all(c is not None for c in calls):
        return "", calls
    return text, []
