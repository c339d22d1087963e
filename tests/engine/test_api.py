"""The OpenAI-compatible server, driven by the official openai client over loopback."""

from __future__ import annotations

import httpx
import openai
import pytest

from chat_fixtures import make_lora_run, serve_app
from engine.serve.api import create_app
from engine.serve.inference import ChatModel
from engine.serve.sampling import SamplingParams

KEY = "sk-test-key"
ASK = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def chat(tiny_model, tmp_path_factory):
    run = make_lora_run(tiny_model, tmp_path_factory.mktemp("ws"))
    return ChatModel.load(str(run / "checkpoint-5"))


@pytest.fixture(scope="module")
def server(chat):
    yield from serve_app(create_app(chat, api_key=KEY, model_name="tiny-lora"))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-lora"]


def test_non_streaming_matches_engine_with_usage(client, chat):
    expected = chat.generate(ASK, SamplingParams(temperature=0, max_new_tokens=12))
    out = client.chat.completions.create(model="tiny-lora", messages=ASK, temperature=0, max_tokens=12)
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(chat.check(ASK)) == expected.prompt_tokens
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_streaming_concatenates_with_usage(client, chat):
    expected = chat.generate(ASK, SamplingParams(temperature=0, max_new_tokens=12))
    chunks = list(client.chat.completions.create(model="tiny-lora", messages=ASK, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == expected.prompt_tokens


def test_n_seed_stop_and_extension(client, chat):
    out = client.chat.completions.create(model="tiny-lora", messages=ASK, temperature=1.0, top_p=0.9, max_tokens=8, n=2, seed=3,
                                         frequency_penalty=0.5, presence_penalty=0.5)
    again = client.chat.completions.create(model="tiny-lora", messages=ASK, temperature=1.0, top_p=0.9, max_tokens=8, n=2, seed=3,
                                           frequency_penalty=0.5, presence_penalty=0.5)
    assert len(out.choices) == 2 and [c.message.content for c in out.choices] == [c.message.content for c in again.choices]
    assert out.usage.completion_tokens == 16
    full = chat.generate(ASK, SamplingParams(temperature=0, max_new_tokens=12))
    word = full.text[len(full.text) // 2:][:3]
    cut = client.chat.completions.create(model="tiny-lora", messages=ASK, temperature=0, max_tokens=12, stop=word)
    assert cut.choices[0].message.content == full.text[: full.text.find(word)]
    assert cut.choices[0].finish_reason == "stop"
    stop_id = full.token_ids[4]
    ext = client.chat.completions.create(model="tiny-lora", messages=ASK, temperature=0, max_tokens=12,
                                         extra_body={"stop_token_ids": [stop_id]})
    assert ext.usage.completion_tokens == full.token_ids.index(stop_id) + 1


def test_bad_requests_get_clear_errors_and_server_stays_up(client, server):
    with pytest.raises(openai.BadRequestError, match="message list is empty"):
        client.chat.completions.create(model="tiny-lora", messages=[])
    with pytest.raises(openai.BadRequestError, match="a tool message must follow an assistant message that calls a tool"):
        client.chat.completions.create(model="tiny-lora", messages=[{"role": "tool", "content": "hi", "tool_call_id": "1"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
        client.chat.completions.create(model="tiny-lora", messages=ASK, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match=r"the prompt is \d+ tokens, \d+ more than"):
        client.chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": "hello " * 2100}], stream=True)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server}/models").status_code == 401  # no key at all
    assert client.chat.completions.create(model="tiny-lora", messages=ASK, temperature=0, max_tokens=3).usage.completion_tokens == 3
