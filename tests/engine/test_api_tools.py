"""Tool calling through the OpenAI-compatible API, driven by the official openai client: a two-step tool
conversation (call, then answer from the tool's result), streamed and not, on a scripted generation.

The model's output is scripted (the tiny random model cannot write a call), everything else is real:
the template renders the schemas and the tool result into the prompt, the answer is tokenized,
decoded and parsed back into OpenAI tool_calls."""

from __future__ import annotations

import json

import openai
import pytest
import torch

from chat_fixtures import serve_app
from engine.serve.api import create_app
from engine.serve.inference import ChatModel
from engine.serve.sampling import InferenceError, parse_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class Scripted(ChatModel):
    """A ChatModel whose generate() writes the next scripted answer (and records the prompt it was given)."""

    script: list[str]
    prompts: list[str]

    def _run(self, kwargs, use_adapter):
        prompt = kwargs["input_ids"][0].tolist()
        self.prompts.append(self.tokenizer.decode(prompt))
        new = self.tokenizer.encode(self.script.pop(0), add_special_tokens=False) + [self.tokenizer.eos_token_id]
        streamer = kwargs.get("streamer")
        if streamer is not None:
            streamer.put(torch.tensor([prompt]))
            for t in new:
                streamer.put(torch.tensor([t]))
            streamer.end()
        return torch.tensor([prompt + new])


@pytest.fixture(scope="module")
def chat(tiny_model):
    model = ChatModel.load(str(tiny_model), template="qwen")
    model.__class__ = Scripted
    model.script, model.prompts = [], []
    return model


@pytest.fixture(scope="module")
def client(chat):
    for url in serve_app(create_app(chat, model_name="tiny")):
        yield openai.OpenAI(base_url=url, api_key="none", max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_two_step_tool_conversation_with_the_openai_client(client, chat, stream):
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    chat.script[:] = [CALL, "It is 21 degrees in Paris."]

    def complete(messages):
        if not stream:
            out = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], temperature=0)
            return out.choices[0].message, out.choices[0].finish_reason
        content, calls, finish = "", {}, None
        for c in client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], stream=True):
            delta = c.choices[0].delta
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                calls.setdefault(tc.index, tc)
            finish = c.choices[0].finish_reason or finish
        return type("M", (), {"content": content or None, "tool_calls": [calls[k] for k in sorted(calls)] or None})(), finish

    first, finish = complete(ask)
    assert finish == "tool_calls" and first.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in first.tool_calls] == [("get_weather",
                                                                                                {"city": "Paris"})]
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in chat.prompts[-1]  # the schemas reached the model
    call = first.tool_calls[0]
    follow = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    second, finish = complete(follow)
    assert (second.content, finish, second.tool_calls) == ("It is 21 degrees in Paris.", "stop", None)
    assert chat.prompts[-1].endswith(CALL + "<|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n"
                                     "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_tool_choice_none_hides_the_tools_and_bad_tools_are_refused(client, chat):
    chat.script[:] = [CALL]
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER],
                                         tool_choice="none")
    assert out.choices[0].message.content == CALL and out.choices[0].finish_reason == "stop"
    assert "<tools>" not in chat.prompts[-1]
    with pytest.raises(openai.BadRequestError, match="tool_choice names function 'nope'"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tools, tool 1: a function schema needs a name"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       tools=[{"type": "function", "function": {"description": "x"}}])


def test_parse_tool_calls():
    assert parse_tool_calls("Let me look.\n" + CALL) == ("Let me look.", [{"name": "get_weather",
                                                                           "arguments": {"city": "Paris"}}])
    assert parse_tool_calls('{"name": "f", "parameters": {"x": 1}}') == ("", [{"name": "f", "arguments": {"x": 1}}])
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert parse_tool_calls("plain answer") == ("plain answer", [])
