"""Formats: each one to its canonical example, auto-detection, column mapping, and bad records."""

from __future__ import annotations

import pytest

from engine.data import FORMATS, KIND_OF_FORMAT, DataError, detect_format, normalize


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


def call(name, arguments, content=""):
    return {"role": "assistant", "content": content,
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def tool(text):
    return {"role": "tool", "content": text}


CASES = [
    ("alpaca", {"instruction": "Translate", "input": "bonjour", "output": "hello"},
     {"messages": [u("Translate\nbonjour"), a("hello")]}),
    ("alpaca", {"instruction": "Hi", "input": "", "output": "Hello", "system": "Be kind.",
                "history": [["Q1", "A1"], ["Q2", "A2"]]},
     {"messages": [s("Be kind."), u("Q1"), a("A1"), u("Q2"), a("A2"), u("Hi"), a("Hello")]}),
    ("alpaca", {"instruction": "", "input": "only input", "output": "ok"},
     {"messages": [u("only input"), a("ok")]}),
    ("sharegpt", {"conversations": [{"from": "system", "value": "Sys"}, {"from": "human", "value": "Q"},
                                    {"from": "gpt", "value": "A"}]},
     {"messages": [s("Sys"), u("Q"), a("A")]}),
    ("sharegpt", {"system": "Tools.", "conversations": [
        {"from": "human", "value": "weather?"}, {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}]},
     {"messages": [s("Tools."), u("weather?"), call("w", {}), tool("sunny"), a("It is sunny.")]}),
    ("fastchat", {"id": "x1", "conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]},
     {"messages": [u("Q"), a("A")]}),
    ("messages", {"messages": [s("S"), u("Q"), a("A"), u("Q2"), a("A2")]},
     {"messages": [s("S"), u("Q"), a("A"), u("Q2"), a("A2")]}),
    ("turns", [{"human": "Q1", "assistant": "A1"}, {"human": "Q2", "assistant": "A2"}],
     {"messages": [u("Q1"), a("A1"), u("Q2"), a("A2")]}),
    ("firefly", {"conversation": [{"human": "Q", "assistant": "A"}], "system": "S"},
     {"messages": [s("S"), u("Q"), a("A")]}),
    ("preference", {"prompt": "Q", "chosen": "good", "rejected": "bad"},
     {"prompt": [u("Q")], "chosen": "good", "rejected": "bad"}),
    ("preference", {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"},
                    "rejected": {"from": "gpt", "value": "bad"}},
     {"prompt": [u("Q")], "chosen": "good", "rejected": "bad"}),
    ("preference", {"prompt": [u("Q")], "chosen": [a("good")], "rejected": [a("bad")]},
     {"prompt": [u("Q")], "chosen": "good", "rejected": "bad"}),
    ("kto", {"prompt": "Q", "completion": "A", "label": True}, {"prompt": [u("Q")], "completion": "A", "label": True}),
    ("kto", {"messages": [u("Q"), a("A")], "label": "false"}, {"prompt": [u("Q")], "completion": "A", "label": False}),
    ("text", {"text": "Some document."}, {"text": "Some document."}),
]


@pytest.mark.parametrize("fmt,record,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_normalize(fmt, record, expected):
    assert normalize(record, fmt) == expected


@pytest.mark.parametrize("fmt,record,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_detect_format(fmt, record, expected):
    assert detect_format(record) == fmt


def test_every_format_has_a_kind_and_a_case():
    assert set(FORMATS) == {c[0] for c in CASES}
    assert set(KIND_OF_FORMAT.values()) == {"sft", "preference", "kto", "pretrain"}


def test_detect_one_turn_object_and_unknown_keys():
    assert detect_format({"human": "Q", "assistant": "A"}) == "turns"
    with pytest.raises(DataError, match=r"cannot tell the format from the keys \(answer, question\)"):
        detect_format({"question": "Q", "answer": "A"})


def test_column_mapping():
    record = {"question": "What?", "context": "ctx", "answer": "That."}
    columns = {"instruction": "question", "input": "context", "output": "answer"}
    assert normalize(record, "alpaca", columns) == {"messages": [u("What?\nctx"), a("That.")]}
    assert normalize({"q": "Q", "good": "g", "bad": "b"}, "preference",
                     {"prompt": "q", "chosen": "good", "rejected": "bad"}) == {"prompt": [u("Q")], "chosen": "g", "rejected": "b"}


def test_missing_mapped_column_names_the_file_column():
    with pytest.raises(DataError) as err:
        normalize({"question": "Q"}, "alpaca", {"instruction": "question", "output": "answer"})
    assert str(err.value) == "field 'answer' is missing, mapped from 'output' (alpaca format needs instruction and output)"
    assert err.value.field == "answer"


@pytest.mark.parametrize("fmt,record,message", [
    ("alpaca", {"instruction": "Q"}, "field 'output' is missing (alpaca format needs instruction and output)"),
    ("alpaca", {"instruction": "Q", "output": "  "}, "field 'output' is empty"),
    ("alpaca", {"instruction": "Q", "output": ["a"]}, "field 'output' must be a string, found list"),
    ("alpaca", {"instruction": "Q", "output": "A", "history": [["only one"]]},
     "field 'history', item 1: expected a [user, assistant] pair"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}]},
     "field 'conversations' must end with an assistant message, but it ends with a user message"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"},
                                    {"from": "gpt", "value": "A"}]},
     "field 'conversations', message 2: expected an assistant message, found user (turns must alternate user, assistant)"),
    ("sharegpt", {"conversations": [{"from": "robot", "value": "Q"}]}, "field 'conversations', message 1: unknown role 'robot'"),
    ("messages", {"messages": [u("Q"), s("late"), a("A")]},
     "field 'messages', message 2: a system message may only come first"),
    ("messages", {"messages": [u("Q"), a("")]}, "field 'messages', message 2: the assistant answer is empty"),
    ("turns", [{"human": "Q"}], "field 'record', turn 1: expected an object with 'human' and 'assistant'"),
    ("preference", {"prompt": "Q", "chosen": "same", "rejected": "same "},
     "fields 'chosen' and 'rejected' are the same answer (a preference pair needs two different answers)"),
    ("preference", {"prompt": "Q", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
    ("preference", {"prompt": [u("Q"), a("A")], "chosen": "g", "rejected": "b"},
     "field 'prompt' must end with a user message, but it ends with an assistant message"),
    ("kto", {"prompt": "Q", "completion": "A", "label": "maybe"}, "field 'label' must be true or false, found 'maybe'"),
    ("text", {"text": ""}, "field 'text' is empty"),
])
def test_bad_records(fmt, record, message):
    with pytest.raises(DataError) as err:
        normalize(record, fmt)
    assert str(err.value).startswith(message)


def test_located_error_is_one_sentence_with_file_and_line():
    with pytest.raises(DataError) as err:
        normalize({"instruction": "Q", "input": ""}, "alpaca")
    located = err.value.located("data/foo.jsonl", 17)
    assert str(located) == "data/foo.jsonl, line 17: field 'output' is missing (alpaca format needs instruction and output)"
    assert (located.file, located.line, located.field) == ("data/foo.jsonl", 17, "output")


WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_sharegpt_function_calling_layout_keeps_tools_calls_and_results():
    """The glaive_toolcall layout: tools as a JSON string, function_call and observation turns."""
    import json
    record = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temp": 21}'}, {"from": "gpt", "value": "21 degrees."}],
        "tools": json.dumps([WEATHER])}
    assert detect_format(record) == "sharegpt"
    assert normalize(record, "sharegpt") == {
        "messages": [u("Weather in Paris?"), call("get_weather", {"city": "Paris"}), tool('{"temp": 21}'),
                     a("21 degrees.")],
        "tools": [{"type": "function", "function": WEATHER}]}


def test_openai_messages_with_tool_calls_and_tool_role():
    record = {"messages": [
        u("Weather in Paris and Rome?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21"}, {"role": "tool", "tool_call_id": "c2", "content": "25"},
        a("Paris 21, Rome 25.")], "tools": [{"type": "function", "function": WEATHER}]}
    example = normalize(record, "messages")
    assert [m["role"] for m in example["messages"]] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c["function"]["arguments"] for c in example["messages"][1]["tool_calls"]] == [{"city": "Paris"},
                                                                                         {"city": "Rome"}]
    assert example["tools"] == [{"type": "function", "function": WEATHER}]


@pytest.mark.parametrize("conversation,message", [
    ([{"from": "human", "value": "Q"}, {"from": "function_call", "value": "not json"}],
     "field 'conversations', message 2: a function_call turn must hold the call as JSON"),
    ([{"from": "human", "value": "Q"}, {"from": "function_call", "value": '{"arguments": {}}'}],
     "field 'conversations', message 2: a tool call must be an object with a name and arguments"),
    ([{"from": "human", "value": "Q"}, {"from": "function_call", "value": '{"name": "f"}'},
      {"from": "human", "value": "again"}],
     "field 'conversations', message 3: expected a tool message (the result of the call before it), found user"),
    ([{"from": "human", "value": "Q"}, {"from": "observation", "value": "r"}],
     "field 'conversations', message 2: a tool message must follow an assistant message that calls a tool"),
])
def test_bad_tool_conversations(conversation, message):
    with pytest.raises(DataError) as err:
        normalize({"conversations": conversation}, "sharegpt")
    assert str(err.value).startswith(message)


def test_bad_tools_column_and_tools_outside_sft():
    conv = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    with pytest.raises(DataError, match="field 'tools' is not valid JSON"):
        normalize({"conversations": conv, "tools": "[{"}, "sharegpt")
    with pytest.raises(DataError, match="field 'tools', tool 1: a function schema needs a name"):
        normalize({"conversations": conv, "tools": [{"description": "x"}]}, "sharegpt")
    prompt = [{"from": "human", "value": "Q"}, {"from": "function_call", "value": '{"name": "f"}'},
              {"from": "observation", "value": "r"}, {"from": "gpt", "value": "A"}, {"from": "human", "value": "and?"}]
    with pytest.raises(DataError, match="tool calls and tool results are supported in sft data only"):
        normalize({"prompt": prompt, "chosen": "x", "rejected": "y"}, "preference")
