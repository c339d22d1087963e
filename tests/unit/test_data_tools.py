"""Tool use: a tool conversation tokenizes as the model's own tool template does, and only the assistant's
calls and answers carry loss (never tool results or schemas)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from engine.data import get_template
from engine.data.encode import IGNORE_INDEX, encode_sft, label_spans
from engine.data.formats import normalize
from engine.data.templates import TemplateError

# Qwen2.5's chat template (its tokenizer_config.json), tool branches included, with Qwen's default system prompt.
QWEN25 = (Path(__file__).parents[1] / "fixtures" / "qwen25_tools.jinja").read_text(encoding="utf-8")
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
GLAIVE = {"conversations": [
    {"from": "human", "value": "Weather in Paris and Rome?"},
    {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                   {"name": "get_weather", "arguments": {"city": "Rome"}}])},
    {"from": "observation", "value": '{"temp": 21}'}, {"from": "observation", "value": '{"temp": 25}'},
    {"from": "gpt", "value": "Paris: 21 °C, Rome: 25 °C."},
    {"from": "human", "value": "Thanks!"}, {"from": "gpt", "value": "You are welcome."}],
    "system": "You are a weather bot.", "tools": json.dumps([WEATHER])}


@pytest.fixture(scope="module")
def qwen_tok(tokenizer):
    tok = copy.deepcopy(tokenizer)  # SmolLM2's tokenizer knows <|im_start|> and <|im_end|>, as Qwen's does
    tok.chat_template = QWEN25
    return tok


def _trained_text(tok, enc) -> str:
    return "".join(text for text, trained in label_spans(tok, enc) if trained)


@pytest.mark.parametrize("name", ["auto", "qwen"])
def test_tool_conversation_tokenizes_as_qwen25_does(qwen_tok, name):
    example = normalize(GLAIVE, "sharegpt")
    enc = encode_sft(example, get_template(name, qwen_tok), qwen_tok, cutoff_len=4096)[0]
    expected = qwen_tok.apply_chat_template(example["messages"], tools=example["tools"], tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]  # a BatchEncoding in transformers 5
    assert enc["input_ids"] == list(expected)
    assert _trained_text(qwen_tok, enc) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "Paris: 21 °C, Rome: 25 °C.<|im_end|>\nYou are welcome.<|im_end|>\n")
    masked = "".join(text for text, trained in label_spans(qwen_tok, enc) if not trained)
    assert '{"temp": 21}' in masked and "get_weather" in masked and "<tools>" in masked  # results and schemas
    labels = [label for label in enc["labels"] if label != IGNORE_INDEX]
    assert labels == [i for i, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX]


def test_openai_messages_give_the_same_tokens_as_the_sharegpt_layout(qwen_tok):
    openai = {"messages": [
        {"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": '{"temp": 25}'},
        {"role": "assistant", "content": "Paris: 21 °C, Rome: 25 °C."},
        {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}],
        "tools": [{"type": "function", "function": WEATHER}]}
    template = get_template("qwen", qwen_tok)
    assert encode_sft(normalize(openai, "messages"), template, qwen_tok, 4096) == \
        encode_sft(normalize(GLAIVE, "sharegpt"), template, qwen_tok, 4096)


def test_generation_prompt_after_tool_results(qwen_tok):
    messages = normalize(GLAIVE, "sharegpt")["messages"][:4]
    tools = [{"type": "function", "function": WEATHER}]
    for name in ("auto", "qwen"):
        assert get_template(name, qwen_tok).render_generation_prompt(messages, tools) == \
            qwen_tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def test_llama3_tool_format(tokenizer):
    example = normalize(GLAIVE, "sharegpt")
    text = get_template("llama3", tokenizer).render(example["messages"], example["tools"])
    assert "Environment: ipython\nYou have access to the following functions." in text
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n'
            '{"name": "get_weather", "parameters": {"city": "Rome"}}<|eot_id|>'
            '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|>'
            '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 25}<|eot_id|>'
            '<|start_header_id|>assistant<|end_header_id|>\n\nParis') in text


def test_templates_without_tool_support_say_so(tokenizer):
    example = normalize(GLAIVE, "sharegpt")
    with pytest.raises(TemplateError, match="template 'alpaca' has no tool format.*use one that has \\(chatml, qwen, "
                                            "llama3\\)"):
        encode_sft(example, get_template("alpaca", tokenizer), tokenizer, 4096)
    with pytest.raises(TemplateError, match="template 'auto': this model's own chat template has no tool support"):
        encode_sft(example, get_template("auto", tokenizer), tokenizer, 4096)  # SmolLM2's template has no tools


@pytest.mark.parametrize("name", ["qwen", "chatml", "llama3"])
def test_saved_jinja_of_a_tool_template_renders_tools_as_the_template_does(tokenizer, name):
    """The chat_template saved with a checkpoint shows schemas, calls and results exactly as training did."""
    example = normalize(GLAIVE, "sharegpt")
    template = get_template(name, tokenizer)
    messages, tools = example["messages"], example["tools"]
    assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=template.jinja()) == \
        template.render(messages, tools)
    assert tokenizer.apply_chat_template(messages[1:5], tools=tools, tokenize=False, chat_template=template.jinja(),
                                         add_generation_prompt=True) == template.render_generation_prompt(messages[1:5], tools)
    plain = [m for m in messages[:1]] + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False, chat_template=template.jinja()) == template.render(plain)
