"""Issue 13, items 4 and 5 for chat, api, stop and data inspect: bad arguments refused at start, before any weights
load, with exit code 2 and one sentence naming the option; the API's answers for an unknown model and max_tokens."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from engine.cli import main
from engine.serve import inference


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded for arguments that cannot work")
    monkeypatch.setattr(inference.ChatModel, "load", classmethod(refuse))


@pytest.fixture
def broken_models(tiny_model, tmp_path):
    no_tokenizer, bad_config = tmp_path / "no-tokenizer", tmp_path / "bad-config"
    shutil.copytree(tiny_model, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    shutil.copytree(tiny_model, bad_config)
    (bad_config / "config.json").write_text("{model_type: llama")
    return no_tokenizer, bad_config


def _refused(capsys, argv, says):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err, err


@pytest.mark.parametrize("flags, says", [
    (["--temperature", "-1"], "--temperature -1.0: input should be greater than or equal to 0"),
    (["--top-p", "5"], "--top-p 5.0: input should be less than or equal to 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: input should be greater than or equal to 1"),
])
def test_chat_sampling_bounds_refused_at_start(tiny_model, capsys, no_load, flags, says):
    _refused(capsys, ["chat", "--model", str(tiny_model), "--single-turn", "--message", "hi", *flags], says)


@pytest.mark.parametrize("flags, says", [
    (["--port", "70000"], "--port 70000: a port number is between 1 and 65535"),
    (["--max-new-tokens", "-5"], "--max-new-tokens -5: input should be greater than or equal to 1"),
    (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: this machine cannot resolve it"),
])
def test_api_arguments_refused_at_start(tiny_model, capsys, no_load, flags, says):
    _refused(capsys, ["api", "--model", str(tiny_model), *flags], says)


def test_api_and_chat_refuse_a_broken_model_directory(broken_models, capsys, no_load):
    no_tokenizer, bad_config = broken_models
    _refused(capsys, ["api", "--model", str(no_tokenizer)], "has no tokenizer files")
    _refused(capsys, ["api", "--model", str(bad_config)], "config.json is not valid JSON")
    _refused(capsys, ["chat", "--model", str(no_tokenizer), "--single-turn", "--message", "hi"], "has no tokenizer files")


def test_stop_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    _refused(capsys, ["stop", str(tmp_path)], f"{tmp_path} is not a run directory")


def test_data_inspect_refuses_cutoff_len_zero(capsys):
    _refused(capsys, ["data", "inspect", "data/identity.json", "--cutoff-len", "0"], "--cutoff-len 0: input should be")


@pytest.fixture(scope="module")
def api(tiny_model):
    from engine.serve.api import create_app

    chat = inference.ChatModel.load(str(tiny_model))
    with TestClient(create_app(chat, model_name="tiny")) as client:
        yield client


ASK = [{"role": "user", "content": "hi"}]


def test_api_unknown_model_is_404_naming_the_served_one(api):
    r = api.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": ASK, "max_tokens": 2})
    assert r.status_code == 404  # before: answered by the loaded model
    assert r.json()["error"]["message"] == "The model 'gpt-4o' does not exist here; this server serves 'tiny'"
    assert api.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 2}).status_code == 200
    assert api.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2}).status_code == 200


def test_api_max_tokens_over_the_limit_names_max_tokens(api):
    r = api.post("/v1/chat/completions", json={"model": "tiny", "messages": ASK, "max_tokens": 10**9})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.startswith("max_tokens: ") and "max_new_tokens" not in message
