"""Dataset formats: detect one from a record's keys and convert records to canonical examples.

Canonical examples, by kind:

* sft        ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``
             (system first if any, then user/assistant alternating, ending with assistant), and for
             tool use ``"tools": [{"type": "function", "function": {name, description, parameters}}]``
             (the schemas the conversation may call): an assistant message may carry
             ``"tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}]``
             and is then followed by one ``tool`` message per result before the next assistant turn
* preference ``{"prompt": [messages ending with user], "chosen": str, "rejected": str}``
* kto        ``{"prompt": [messages ending with user], "completion": str, "label": bool}``
* pretrain   ``{"text": str}``

Problems raise :class:`DataError` naming the field; the loader adds the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import readers
from .errors import DataError
from .readers import read_records  # noqa: F401  (part of this module's public interface)
from .tools import has_tools, parse_tools, tool_call  # noqa: F401  (tool_call, parse_tools: public here too)

KIND_OF_FORMAT: dict[str, str] = {
    "alpaca": "sft", "sharegpt": "sft", "messages": "sft", "turns": "sft", "fastchat": "sft",
    "firefly": "sft", "preference": "preference", "kto": "kto", "text": "pretrain",
}
FORMATS: tuple[str, ...] = tuple(KIND_OF_FORMAT)
KINDS: tuple[str, ...] = ("sft", "preference", "kto", "pretrain")

# The canonical fields each format reads (a column mapping renames the file's columns to these),
# the ones it cannot do without first. Preference and KTO records take their prompt from
# ``prompt`` or from a ``conversations``/``messages`` list; ``turns`` records are bare lists.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output", "input", "system", "history"),
    "sharegpt": ("conversations", "system", "tools"), "fastchat": ("conversations", "system"),
    "messages": ("messages", "system", "tools"), "turns": (), "firefly": ("conversation", "system"),
    "preference": ("chosen", "rejected", "prompt", "conversations", "messages", "system"),
    "kto": ("label", "prompt", "completion", "messages", "conversations", "system"),
    "text": ("text",),
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"), "sharegpt": ("conversations",), "fastchat": ("conversations",),
    "messages": ("messages",), "turns": (), "firefly": ("conversation",), "preference": ("chosen", "rejected"),
    "kto": ("label",), "text": ("text",),
}

# Speaker names in sharegpt ("from") and OpenAI-style ("role") messages. A function_call turn is an
# assistant turn that calls a tool (its value the call's JSON); observation, tool, function (OpenAI's
# legacy role for a function's result) and ipython (Llama 3's) are tool results.
ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "function_call": "function_call", "observation": "tool", "tool": "tool", "function": "tool", "ipython": "tool",
}


def detect_format(record: Any) -> str:
    """The format of one record, from its keys (a top-level list is a ``turns`` conversation)."""
    if isinstance(record, list):
        return "turns"
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, found {type(record).__name__}")
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "label" in keys and keys & {"completion", "messages", "conversations"}:
        return "kto"
    if "conversation" in keys:
        return "firefly"
    if "conversations" in keys:
        return "fastchat" if "id" in keys and "system" not in keys else "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"human", "assistant"} <= keys:
        return "turns"  # one turn object of a .json file that holds a whole conversation
    if "text" in keys:
        return "text"
    shown = ", ".join(sorted(map(str, keys))[:8]) or "none"
    raise DataError(f"cannot tell the format from the keys ({shown}); expected instruction+output (alpaca), "
                    "conversations (sharegpt), messages, conversation (firefly), prompt+chosen+rejected "
                    "(preference), label (kto) or text; or choose the format and map the file's columns to its fields")


def normalize(record: Any, fmt: str, columns: dict[str, str] | None = None) -> dict:
    """Rename mapped columns (canonical field -> file column), then convert to the canonical example."""
    if fmt not in KIND_OF_FORMAT:
        raise DataError(f"unknown format '{fmt}' (one of {', '.join(FORMATS)})", field="format")
    if fmt == "turns":
        return {"messages": _turns(record, "record")}
    if not isinstance(record, dict):
        raise DataError(f"{fmt} format needs a JSON object per record, found {type(record).__name__}")
    rec = _Record(record, columns or {})
    return _CONVERTERS[fmt](rec)


def iter_examples(path: str | Path, fmt: str, columns: dict[str, str] | None = None,
                  limit: int | None = None, sample_by: readers.SampleBy = "line") -> Iterator[tuple[int, dict]]:
    """(line, canonical example) for each record of a file; errors name the file and line.

    In a .json file of format ``turns``, the {human, assistant} objects of the top-level array
    are the turns of ONE conversation (a nested list is a conversation of its own). ``sample_by``
    cuts a .txt file into rows (see ``readers.read_records``).
    """
    path = Path(path)
    for line, record in raw_records(path, fmt, limit, sample_by=sample_by):
        try:
            yield line, normalize(record, fmt, columns)
        except DataError as err:
            raise err.located(path, line) from None


def raw_records(path: Path, fmt: str, limit: int | None = None, on_error: readers.OnError | None = None,
                sample_by: readers.SampleBy = "line") -> Iterator[tuple[int, Any]]:
    """The file's records as ``normalize`` takes them in format ``fmt`` (see ``iter_examples``)."""
    if fmt != "turns" or path.suffix.lower() != ".json":
        yield from readers.read_records(path, limit, on_error, sample_by)
        return
    turns, first, count = [], None, 0
    for line, record in readers.read_records(path, on_error=on_error):
        if isinstance(record, list):
            yield line, record
            count += 1
            if limit is not None and count >= limit:
                return
        else:
            first = line if first is None else first
            turns.append(record)
    if turns and (limit is None or count < limit):
        yield first, turns


class _Record:
    """A record seen through a column mapping; errors name the file's own column."""

    def __init__(self, record: dict, columns: dict[str, str]):
        self.data, self.columns = record, columns

    def name(self, field: str) -> str:
        return self.columns.get(field, field)

    def has(self, field: str) -> bool:
        return self.data.get(self.name(field)) not in (None, "")

    def get(self, field: str, default: Any = None) -> Any:
        value = self.data.get(self.name(field))
        return default if value is None else value

    def require(self, field: str, why: str) -> Any:
        col = self.name(field)
        if col not in self.data or self.data[col] is None:
            mapped = f", mapped from '{field}'" if col != field else ""
            raise DataError(f"field '{col}' is missing{mapped} ({why})", field=col)
        return self.data[col]

    def text(self, field: str, why: str, allow_empty: bool = False) -> str:
        return _text(self.require(field, why), self.name(field), allow_empty)

    def optional_text(self, field: str) -> str:
        return _text(self.get(field, ""), self.name(field), allow_empty=True)


def _text(value: Any, field: str, allow_empty: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"field '{field}' must be a string, found {type(value).__name__}", field=field)
    value = str(value)
    if not allow_empty and not value.strip():
        raise DataError(f"field '{field}' is empty", field=field)
    return value


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _an(word: str) -> str:
    return f"{'an' if word[0] in 'aeio' else 'a'} {word}"  # a user, an assistant


_NEXT = {None: ("user",), "user": ("assistant",), "answer": ("user",), "call": ("tool",), "tool": ("tool", "assistant")}


def _step(m: dict) -> str:
    return ("call" if m.get("tool_calls") else "answer") if m["role"] == "assistant" else m["role"]


def check_chat(messages: list[dict], field: str, end: str | None = "assistant") -> list[dict]:
    """Check system-first, user/assistant alternation, and that the last message is ``end`` (None: any). An
    assistant message that calls tools is followed by one or more tool messages, then by the next assistant one."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise DataError(f"field '{field}' has no user message", field=field)
    offset = len(messages) - len(body)
    prev = None
    for i, m in enumerate(body):
        allowed = _NEXT[prev]
        if m["role"] not in allowed:
            where = "message 1" if offset + i == 0 else f"message {offset + i + 1}"
            if m["role"] == "system":
                problem = "a system message may only come first"
            elif prev == "call":
                problem = f"expected a tool message (the result of the call before it), found {m['role']}"
            elif m["role"] == "tool":
                problem = "a tool message must follow an assistant message that calls a tool"
            else:
                problem = (f"expected {_an(allowed[-1])} message, found {m['role']} (turns must alternate user, "
                           "assistant)")
            raise DataError(f"field '{field}', {where}: {problem}", field=field)
        prev = _step(m)
    if end is not None and body[-1]["role"] != end:
        raise DataError(f"field '{field}' must end with {_an(end)} message, but it ends with "
                        f"{_an(body[-1]['role'])} message", field=field)
    for i, m in enumerate(body if end is not None else ()):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise DataError(f"field '{field}', message {offset + i + 1}: the assistant answer is empty", field=field)
    return messages


def _no_tools(messages: list[dict], field: str) -> list[dict]:
    if has_tools(messages):
        raise DataError(f"field '{field}': tool calls and tool results are supported in sft data only", field=field)
    return messages


def _speakers(items: Any, field: str, role_key: str, content_key: str) -> list[dict]:
    """Messages from a list of {from, value} (sharegpt) or {role, content} (OpenAI) objects, with tool calls
    (a function_call turn, or OpenAI's tool_calls) and tool results (observation, tool)."""
    if not isinstance(items, list) or not items:
        raise DataError(f"field '{field}' must be a non-empty list of messages", field=field)
    out = []
    for i, item in enumerate(items, 1):
        calls = item.get("tool_calls") if isinstance(item, dict) else None
        if not isinstance(item, dict) or role_key not in item or (content_key not in item and not calls):
            raise DataError(f"field '{field}', message {i}: expected an object with '{role_key}' and "
                            f"'{content_key}'", field=field)
        role = ROLES.get(str(item[role_key]).lower())
        if role is None:
            raise DataError(f"field '{field}', message {i}: unknown role '{item[role_key]}' "
                            f"(one of {', '.join(ROLES)})", field=field)
        content = item.get(content_key)
        if role == "function_call":
            if isinstance(content, str):
                try:
                    content = json.loads(content)
                except json.JSONDecodeError as err:
                    raise DataError(f"field '{field}', message {i}: a function_call turn must hold the call as JSON, "
                                    f'e.g. {{"name": "get_weather", "arguments": {{"city": "Paris"}}}} ({err.msg})',
                                    field=field) from None
            role, calls, content = "assistant", content if isinstance(content, list) else [content], ""
        if calls:
            if role != "assistant":
                raise DataError(f"field '{field}', message {i}: only an assistant message may carry tool_calls",
                                field=field)
            if not isinstance(calls, list):
                calls = [calls]
            out.append({"role": "assistant", "content": "" if content is None else _text(content, field, True),
                        "tool_calls": [tool_call(c, field, f"message {i}") for c in calls]})
            continue
        if role == "tool" and isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)
        out.append(_msg(role, _text(content, f"{field}", allow_empty=True)))
    return out


def _with_system(rec: _Record, messages: list[dict]) -> list[dict]:
    system = rec.optional_text("system")
    if system and not (messages and messages[0]["role"] == "system"):
        return [_msg("system", system)] + messages
    return messages


def _chat_of(rec: _Record, why: str) -> tuple[list[dict], str]:
    """The conversation of a record in sharegpt (conversations) or OpenAI (messages) style."""
    if rec.has("conversations"):
        return _with_system(rec, _speakers(rec.get("conversations"), rec.name("conversations"), "from", "value")), \
            rec.name("conversations")
    if rec.has("messages"):
        return _with_system(rec, _speakers(rec.get("messages"), rec.name("messages"), "role", "content")), \
            rec.name("messages")
    rec.require("messages", why)
    raise AssertionError  # require raised


def _alpaca(rec: _Record) -> dict:
    why = "alpaca format needs instruction and output"
    instruction = rec.text("instruction", why, allow_empty=True)
    extra = rec.optional_text("input")
    output = rec.text("output", why)
    query = "\n".join(part for part in (instruction, extra) if part.strip())
    if not query.strip():
        raise DataError(f"field '{rec.name('instruction')}' is empty (and there is no input)",
                        field=rec.name("instruction"))
    messages = []
    history = rec.get("history", [])
    if not isinstance(history, list):
        raise DataError(f"field '{rec.name('history')}' must be a list of [user, assistant] pairs",
                        field=rec.name("history"))
    for i, pair in enumerate(history, 1):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise DataError(f"field '{rec.name('history')}', item {i}: expected a [user, assistant] pair",
                            field=rec.name("history"))
        messages += [_msg("user", _text(pair[0], rec.name("history"))), _msg("assistant", _text(pair[1], rec.name("history")))]
    messages += [_msg("user", query), _msg("assistant", output)]
    return {"messages": check_chat(_with_system(rec, messages), rec.name("output"))}


def _chat(rec: _Record, key: str, role_key: str, content_key: str, why: str) -> dict:
    field = rec.name(key)
    example = {"messages": check_chat(_with_system(rec, _speakers(rec.require(key, why), field, role_key, content_key)),
                                      field)}
    tools = parse_tools(rec.get("tools"), rec.name("tools"))
    if tools:
        example["tools"] = tools
    return example


def _sharegpt(rec: _Record) -> dict:
    return _chat(rec, "conversations", "from", "value",
                 "sharegpt format needs conversations: a list of {from, value} messages")


def _messages(rec: _Record) -> dict:
    return _chat(rec, "messages", "role", "content", "messages format needs messages: a list of {role, content} objects")


def _turns(items: Any, field: str, system: str = "") -> list[dict]:
    """A list of {human, assistant} objects (turns and firefly formats)."""
    if not isinstance(items, list) or not items:
        raise DataError(f"field '{field}' must be a non-empty list of {{human, assistant}} objects", field=field)
    messages = [_msg("system", system)] if system else []
    for i, turn in enumerate(items, 1):
        if not isinstance(turn, dict) or "human" not in turn or "assistant" not in turn:
            raise DataError(f"field '{field}', turn {i}: expected an object with 'human' and 'assistant'", field=field)
        if i == 1 and turn.get("system") and not system:
            messages.append(_msg("system", _text(turn["system"], field)))
        messages += [_msg("user", _text(turn["human"], field)), _msg("assistant", _text(turn["assistant"], field))]
    return check_chat(messages, field)


def _firefly(rec: _Record) -> dict:
    items = rec.require("conversation", "firefly format needs conversation: a list of {human, assistant} objects")
    return {"messages": _turns(items, rec.name("conversation"), rec.optional_text("system"))}


def _answer(value: Any, field: str) -> str:
    """chosen/rejected: a string, a {from,value} or {role,content} message, or a list ending with one."""
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        for role_key, content_key in (("from", "value"), ("role", "content")):
            if content_key in value:
                if ROLES.get(str(value.get(role_key, "assistant")).lower()) != "assistant":
                    raise DataError(f"field '{field}' must be an assistant message, found '{value.get(role_key)}'",
                                    field=field)
                value = value[content_key]
                break
    return _text(value, field)


def _prompt(rec: _Record, why: str) -> list[dict]:
    if rec.has("prompt"):
        value, field = rec.get("prompt"), rec.name("prompt")
        if isinstance(value, list):
            messages = _speakers(value, field, "role", "content") if value and isinstance(value[0], dict) \
                and "role" in value[0] else _speakers(value, field, "from", "value")
        else:
            messages = [_msg("user", _text(value, field))]
        return _no_tools(check_chat(_with_system(rec, messages), field, end="user"), field)
    messages, field = _chat_of(rec, why)
    return _no_tools(check_chat(messages, field, end="user"), field)


def _preference(rec: _Record) -> dict:
    why = "preference format needs prompt (or conversations), chosen and rejected"
    prompt = _prompt(rec, why)
    chosen = _answer(rec.require("chosen", why), rec.name("chosen"))
    rejected = _answer(rec.require("rejected", why), rec.name("rejected"))
    if chosen.strip() == rejected.strip():
        raise DataError(f"fields '{rec.name('chosen')}' and '{rec.name('rejected')}' are the same answer "
                        "(a preference pair needs two different answers)", field=rec.name("chosen"))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


_TRUE, _FALSE = {"true", "1", "yes", "y", "t"}, {"false", "0", "no", "n", "f"}


def _label(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"field '{field}' must be true or false, found {value!r}", field=field)


def _kto(rec: _Record) -> dict:
    why = "kto format needs prompt, completion and label (or messages and label)"
    label = _label(rec.require("label", why), rec.name("label"))
    if rec.has("completion") or rec.has("prompt"):
        prompt = _prompt(rec, why)
        completion = rec.text("completion", why)
    else:
        messages, field = _chat_of(rec, why)
        _no_tools(check_chat(messages, field), field)
        prompt, completion = messages[:-1], messages[-1]["content"]
    return {"prompt": prompt, "completion": completion, "label": label}


def _plain_text(rec: _Record) -> dict:
    return {"text": rec.text("text", "text format needs a text field")}


_CONVERTERS = {
    "alpaca": _alpaca, "sharegpt": _sharegpt, "fastchat": _sharegpt, "messages": _messages,
    "firefly": _firefly, "preference": _preference, "kto": _kto, "text": _plain_text,
}
