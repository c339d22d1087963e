"""ChatModel: parity with plain transformers generate, streaming, stop handling, adapters, bad input."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from chat_fixtures import make_lora_run
from engine.serve.inference import ChatModel
from engine.serve.sampling import InferenceError, SamplingParams, resolve_target

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)
ASK = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    return make_lora_run(tiny_model, tmp_path_factory.mktemp("ws"))


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return ChatModel.load(str(tiny_model))


@pytest.fixture(scope="module")
def tuned(lora_run):
    return ChatModel.load(str(lora_run / "checkpoint-5"))


def test_greedy_matches_plain_generate_on_default_model(default_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    messages = [{"role": "system", "content": "You are a geography teacher."},
                {"role": "user", "content": "Name three rivers in Europe and say where each one starts."}]
    chat = ChatModel.load(str(default_model))
    ours = chat.generate(messages, SamplingParams(temperature=0, max_new_tokens=20))

    tok = AutoTokenizer.from_pretrained(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20)[0, ids.shape[1]:]
    assert ours.prompt_tokens == ids.shape[1]
    assert ours.token_ids == plain.tolist()
    assert ours.text == tok.decode(plain, skip_special_tokens=True)
    assert ours.completion_tokens == 20 and ours.finish_reason == "length"

    stream = chat.stream(messages, SamplingParams(temperature=0, max_new_tokens=20))
    pieces = list(stream)
    assert len(pieces) > 3 and "".join(pieces) == ours.text
    assert stream.result.token_ids == ours.token_ids

    short = chat.generate([{"role": "user", "content": "What is the capital of France?"}], GREEDY)
    assert short.text == "The capital of France is Paris." and short.finish_reason == "stop"


def test_stream_concatenates_to_generate(tiny):
    whole = tiny.generate(ASK, GREEDY)
    assert whole.completion_tokens == 24 and whole.text
    stream = tiny.stream(ASK, GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    assert stream.result.completion_tokens == whole.completion_tokens
    assert stream.result.prompt_tokens == whole.prompt_tokens == len(tiny.prompt_ids(ASK))


def test_stop_strings_are_cut_in_both_modes(tiny):
    full = tiny.generate(ASK, GREEDY).text
    word = full[len(full) // 2: len(full) // 2 + 3]
    params = GREEDY.model_copy(update={"stop": [word]})
    cut = tiny.generate(ASK, params)
    assert cut.text == full[: full.find(word)] and cut.finish_reason == "stop"
    stream = tiny.stream(ASK, params)
    assert "".join(stream) == cut.text and stream.result.finish_reason == "stop"


def test_stop_token_ids_end_the_answer(tiny):
    ids = tiny.generate(ASK, GREEDY).token_ids
    stop_id = ids[5]
    first = ids.index(stop_id)
    out = tiny.generate(ASK, GREEDY.model_copy(update={"stop_token_ids": [stop_id]}))
    assert out.token_ids == ids[: first + 1] and out.finish_reason == "stop"


def test_seed_repeats_sampling_and_penalties_change_it(tiny):
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=16, seed=7)
    a, b = tiny.generate(ASK, params), tiny.generate(ASK, params)
    assert a.token_ids == b.token_ids
    greedy = tiny.generate(ASK, GREEDY)
    penalised = tiny.generate(ASK, GREEDY.model_copy(update={"frequency_penalty": 2.0, "presence_penalty": 2.0}))
    assert len(set(penalised.token_ids)) >= len(set(greedy.token_ids)) and penalised.token_ids != greedy.token_ids


def test_cancel_stops_the_stream(tiny):
    stream = tiny.stream(ASK, SamplingParams(temperature=0, max_new_tokens=400))
    next(stream)
    stream.cancel()
    rest = list(stream)
    assert stream.result.finish_reason == "cancelled"
    assert stream.result.completion_tokens < 400 and isinstance(rest, list)


def test_checkpoint_brings_base_adapter_and_template(tuned, tiny, lora_run, tiny_model):
    target = resolve_target(str(lora_run))  # a run directory means its newest checkpoint
    assert target.adapters == [str(lora_run / "checkpoint-5")] and target.base == str(tiny_model)
    assert target.template == "auto" and tuned.template.name == "auto"
    with_adapter = tuned.generate(ASK, GREEDY)
    without = tuned.generate(ASK, GREEDY, use_adapter=False)
    assert with_adapter.token_ids != without.token_ids  # side by side: the adapter changes the answer
    assert without.token_ids == tiny.generate(ASK, GREEDY).token_ids  # and disabling it gives the base model back
    explicit = ChatModel.load(str(tiny_model), adapters=[str(lora_run / "checkpoint-5")])
    assert explicit.generate(ASK, GREEDY).token_ids == with_adapter.token_ids


def test_template_override_warns(lora_run):
    chat = ChatModel.load(str(lora_run / "checkpoint-5"), template="chatml")
    assert any("overrides 'auto'" in w for w in chat.warnings)


def test_4bit_load_generates(tiny_model):
    chat = ChatModel.load(str(tiny_model), quantization="nf4")
    assert getattr(chat.model, "is_loaded_in_4bit", False)
    assert chat.generate(ASK, SamplingParams(temperature=0, max_new_tokens=4)).completion_tokens == 4


def test_unknown_run_checkpoint_or_adapter(tmp_path, tiny_model, lora_run):
    with pytest.raises(InferenceError, match="model not found"):
        ChatModel.load(str(tmp_path / "no-such-run"))
    with pytest.raises(InferenceError, match="adapter not found"):
        ChatModel.load(str(tiny_model), adapters=[str(lora_run / "checkpoint-999")])
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    (tmp_path / "runs" / "empty" / "config.yaml").write_text("model: {path: x}\n")
    with pytest.raises(InferenceError, match="no checkpoint"):
        ChatModel.load(str(tmp_path / "runs" / "empty"))


def test_adapter_for_another_base_is_refused(tmp_path, tiny_model, lora_run):
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["hidden_size"] = 96
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(InferenceError, match="does not match this base model.*hidden_size 64 vs 96"):
        ChatModel.load(str(other), adapters=[str(lora_run / "checkpoint-5")])


def test_bad_messages_and_params(tiny):
    with pytest.raises(InferenceError, match="empty"):
        tiny.generate([], GREEDY)
    with pytest.raises(InferenceError, match="role 'narrator' is not known"):
        tiny.generate([{"role": "narrator", "content": "x"}], GREEDY)
    with pytest.raises(InferenceError, match="a tool message must follow an assistant message that calls a tool"):
        tiny.generate([{"role": "tool", "content": "x"}], GREEDY)  # a tool result needs the call it answers
    with pytest.raises(InferenceError, match="last message must come from the user"):
        tiny.generate([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], GREEDY)
    with pytest.raises(ValidationError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    long = [{"role": "user", "content": "hello " * 2100}]
    with pytest.raises(InferenceError, match=r"the prompt is \d+ tokens, \d+ more than .* context window of 2048") as err:
        tiny.generate(long, GREEDY)
    assert err.value.kind == "context_length"
    assert tiny.generate(ASK, GREEDY).completion_tokens == 24  # still serving
