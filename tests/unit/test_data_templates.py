"""Chat templates: token parity with the default model's own template, and every registry entry."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from engine.data import TemplateError, get_template, suggest_template, template_mismatch, template_names
from engine.data.templates import load_templates

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    "single+system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello!"}],
    "multi": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
              {"role": "user", "content": " And times 3?\n"}, {"role": "assistant", "content": "12.\n\nDone."},
              {"role": "user", "content": "你好，你是谁？"}, {"role": "assistant", "content": "我是 Orion。"}],
    "multi+system": [{"role": "system", "content": "You are Orion."}, {"role": "user", "content": "Who are you?"},
                     {"role": "assistant", "content": "I am Orion."}, {"role": "user", "content": "Thanks"},
                     {"role": "assistant", "content": "You're welcome!"}],
}


def reference_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(params=["auto", "chatml"])
def smol_template(request, tokenizer):
    return get_template(request.param, tokenizer, default_system=None if request.param == "auto" else SMOL_SYSTEM)


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_parity_with_the_default_models_chat_template(tokenizer, smol_template, conv):
    messages = CONVERSATIONS[conv]
    pairs = smol_template.encode_turns(tokenizer, messages)
    assert len(pairs) == sum(m["role"] == "assistant" for m in messages)
    assert [i for p, r in pairs for i in p + r] == reference_ids(tokenizer, messages)
    for k, (prompt, response) in enumerate(pairs):  # each prompt ends where apply_chat_template's generation prompt does
        upto = [i for p, r in pairs[:k] for i in p + r] + prompt
        last_user = [i for i, m in enumerate(messages) if m["role"] == "user"][k]
        assert upto == reference_ids(tokenizer, messages[: last_user + 1], add_generation_prompt=True)
        assert response[-2:] == [tokenizer.eos_token_id, 198]  # "<|im_end|>\n" closes each answer


def test_first_prompt_holds_the_default_system_prompt(tokenizer, smol_template):
    prompt, response = smol_template.encode_turns(tokenizer, CONVERSATIONS["single"])[0]
    assert tokenizer.decode(prompt) == f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert response == [19556, 17, 2, 198]  # "Hello!" "<|im_end|>" "\n"
    assert smol_template.default_system == SMOL_SYSTEM
    assert smol_template.stop_token_ids(tokenizer) == [2]


def test_generation_prompt_matches(tokenizer, smol_template):
    messages = CONVERSATIONS["multi"][:3]
    assert smol_template.render_generation_prompt(messages) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_names_and_required_entries():
    names = template_names()
    assert names[0] == "auto"
    for required in ["default", "alpaca", "vicuna", "chatml", "qwen", "llama2", "llama3", "mistral", "zephyr", "baichuan",
                     "baichuan2", "chatglm3", "yuan2", "gemma", "phi3", "deepseek", "empty"]:
        assert required in names
    assert load_templates()["qwen"].default_system == "You are a helpful assistant."


@pytest.mark.parametrize("name", [n for n in template_names() if n != "auto"])
@pytest.mark.parametrize("conv", ["multi", "multi+system"])
def test_registry_template_renders_and_its_jinja_agrees(tokenizer, name, conv):
    template = get_template(name, tokenizer)
    messages = CONVERSATIONS[conv]
    text = template.render(messages)
    pairs = template.encode_turns(tokenizer, messages)
    assert len(pairs) == sum(m["role"] == "assistant" for m in messages) and all(p and r for p, r in pairs)
    assert tokenizer.decode([i for p, r in pairs for i in p + r]) == text
    assert tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template.jinja()) == text
    prompt = messages[:-1]
    assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                         chat_template=template.jinja()) == template.render_generation_prompt(prompt)
    system = messages[0]["content"] if messages[0]["role"] == "system" else template.default_system
    if system:
        assert system in text


def test_exact_renderings(tokenizer):
    conv = CONVERSATIONS["single+system"]
    assert get_template("llama2", tokenizer).render(conv) == \
        "<|im_start|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! <|im_end|>"
    assert get_template("alpaca", tokenizer).render(CONVERSATIONS["multi"][:4]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhat is 2 + 2?\n\n### Response:\n4.<|im_end|>\n\n"
        "### Instruction:\n And times 3?\n\n\n### Response:\n12.\n\nDone.<|im_end|>")
    assert get_template("llama3", tokenizer).render(conv) == (
        "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Hello!<|eot_id|>")


def test_separator_is_in_the_next_prompt_not_the_answer(tokenizer):
    pairs = get_template("alpaca", tokenizer).turn_texts(CONVERSATIONS["multi"][:4])
    assert pairs[0][1] == "4.<|im_end|>"
    assert pairs[1][0].startswith("\n\n### Instruction:")


def test_unknown_template_lists_known_names(tokenizer):
    with pytest.raises(TemplateError) as err:
        get_template("chatml2", tokenizer)
    assert "unknown template 'chatml2'" in str(err.value) and "auto, default, alpaca" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_auto_needs_a_chat_template(saved):
    base = saved
    base.chat_template = None
    with pytest.raises(TemplateError, match="has none .*pick a registry template"):
        get_template("auto", base)
    assert suggest_template(base) == "default"
    assert template_mismatch(base, "default") is None


def test_auto_rejects_a_template_that_is_not_prefix_stable(saved):
    tok = saved
    # renders only the last message: earlier turns vanish as the conversation grows
    tok.chat_template = "{{ messages[-1]['role'] + ': ' + messages[-1]['content'] + '\n' }}"
    with pytest.raises(TemplateError, match="not prefix-stable"):
        get_template("auto", tok).encode_turns(tok, CONVERSATIONS["multi"])


def test_suggest_and_mismatch(tokenizer):
    assert suggest_template(tokenizer) == "auto"
    assert template_mismatch(tokenizer, "auto") is None
    warning = template_mismatch(tokenizer, "llama3")
    assert warning.startswith("Template 'llama3' does not match this model's own chat template")
    assert "use template 'auto' or 'chatml'" in warning
    qwen = template_mismatch(tokenizer, "qwen")
    assert "has the model's chat format but not its default system prompt" in qwen and SMOL_SYSTEM in qwen


@pytest.fixture(scope="module")
def saved(default_model):
    """A second copy of the default tokenizer whose chat template a test may replace."""
    return AutoTokenizer.from_pretrained(default_model)


@pytest.mark.parametrize("name", [n for n in template_names() if n != "auto"])
def test_saved_jinja_round_trips_through_auto(saved, tokenizer, name):
    """A checkpoint saved with template.jinja() as its chat_template trains and chats the same under 'auto'."""
    template = get_template(name, tokenizer)
    saved.chat_template = template.jinja()
    auto = get_template("auto", saved)
    assert auto.default_system == template.default_system
    for conv in ("multi", "multi+system"):
        assert auto.encode_turns(saved, CONVERSATIONS[conv]) == template.encode_turns(tokenizer, CONVERSATIONS[conv])


def test_alpaca_system_prompt_is_its_own_block(tokenizer):
    """An explicit system prompt is followed by a blank line, as the default one is (it was glued to the header)."""
    alpaca = get_template("alpaca", tokenizer)
    assert alpaca.render(CONVERSATIONS["single+system"]).startswith("Be brief.\n\n### Instruction:\nHi there")
    assert alpaca.render(CONVERSATIONS["single+system"][1:]).startswith(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nHi there")
