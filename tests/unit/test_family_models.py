"""Beyond Llama, without training: each family's tiny model (tests/families.py) loads through the engine, its chat
template renders token for token through the project's templates, the Model tab reads its facts and memory estimate,
the LoRA target check knows its modules, and vocabulary extension works on its tokenizer (SentencePiece included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from families import MISTRAL_V03_TEMPLATE, REGISTRY_TEMPLATE, family_model

FAMILIES = ("qwen2", "mistral", "gemma")  # llama: the conftest tiny_model, covered by every other test
ROOT = Path(__file__).resolve().parents[2]

# each family's end-of-answer token: what the template closes an answer with and generation stops at
END = {"qwen2": "<|im_end|>", "mistral": "</s>", "gemma": "<end_of_turn>"}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "You are Orion."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "你好，你是谁？"},
     {"role": "assistant", "content": "我是 Orion。def f(x): return x * 10"}],
]


@pytest.fixture(params=FAMILIES)
def family(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, family_model(tmp_path_factory, request.param)


def _tokenizer(path: Path):
    from engine.data.encode import load_tokenizer
    from engine.run.config import ModelConfig

    return load_tokenizer(ModelConfig(path=str(path)))


def test_the_engine_loads_each_family_with_its_quirks(family):
    from engine.run.config import ModelConfig
    from engine.train.model_setup import load_base_model

    name, path = family
    tok = _tokenizer(path)
    model = load_base_model(ModelConfig(path=str(path)))
    cfg = model.config
    assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                                    "gemma": "GemmaForCausalLM"}[name]
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == (name != "mistral")
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (name == "qwen2") and attn.o_proj.bias is None
    if name == "mistral":
        assert cfg.sliding_window == 4096
    if name == "gemma":
        assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size and cfg.num_key_value_heads == 1
        assert (path / "tokenizer.model").is_file() and type(tok).__name__ == "GemmaTokenizer"
    if name == "mistral":
        assert (path / "tokenizer.model").is_file()
    ids = tok("Hello 你好 42", return_tensors="pt").input_ids
    assert (ids[0, 0].item() == tok.bos_token_id) == (name != "qwen2")  # Qwen has no bos; the others add theirs
    assert tok.decode(ids[0], skip_special_tokens=True) == "Hello 你好 42"  # byte fallback round-trips Chinese
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_template_parity_with_the_familys_own_template(family, conv):
    from engine.data.templates import get_template, template_mismatch

    name, path = family
    tok = _tokenizer(path)
    messages = CONVERSATIONS[conv]
    reference = list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    end = tok.convert_tokens_to_ids(END[name])
    for template in (get_template("auto", tok), get_template(REGISTRY_TEMPLATE[name], tok)):
        pairs = template.encode_turns(tok, messages)
        assert [i for p, r in pairs for i in p + r] == reference, template.name
        assert all(end in r for _, r in pairs), template.name
        assert end in template.stop_token_ids(tok), template.name
        prompt = messages[:-1]
        assert template.render_generation_prompt(prompt) == tok.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True), template.name
    assert template_mismatch(tok, REGISTRY_TEMPLATE[name]) is None
    assert template_mismatch(tok, "llama3") is not None
    if name != "qwen2":  # a bos in the text is not doubled when the prompt is tokenized
        assert reference.count(tok.bos_token_id) == 1


def test_advice_for_mistrals_own_template_that_auto_cannot_split(tmp_path_factory, tmp_path):
    """Mistral v0.3's template moves the system prompt to the last instruction: 'auto' refuses it, so the advice must
    name the registry template that renders it, never 'auto'."""
    from engine.data.templates import TemplateError, get_template, suggest_template, template_mismatch
    from webui import chatfmt

    tok = _tokenizer(family_model(tmp_path_factory, "mistral"))
    tok.chat_template = MISTRAL_V03_TEMPLATE
    with pytest.raises(TemplateError, match="not prefix-stable"):
        get_template("auto", tok).encode_turns(tok, CONVERSATIONS[1])
    assert suggest_template(tok) == "mistral" and template_mismatch(tok, "mistral") is None
    for name in ("auto", "llama3"):
        said = template_mismatch(tok, name)
        assert "use template 'mistral'" in said and "'auto' or" not in said, said
    tok.save_pretrained(tmp_path)
    kind, said = chatfmt.advice(tmp_path, "auto")
    assert kind == "mismatch" and "not prefix-stable" in said and chatfmt.suggested(tmp_path) == "mistral"


def test_model_tab_facts_and_memory_estimate(family):
    from transformers import AutoModelForCausalLM

    from peft import LoraConfig, get_peft_model
    from webui import chatfmt, modelinfo
    from webui.tabs.model import info_html

    name, path = family
    info = modelinfo.inspect_model(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert info.params == sum(p.numel() for p in model.parameters())
    cfg = model.config
    assert (info.layers, info.hidden, info.heads, info.kv_heads, info.head_dim, info.vocab) == (
        2, 64, 4, cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or 16, cfg.vocab_size)
    assert info.chat_template and info.model_type == name
    peft = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert modelinfo.lora_params(info, 8) == peft.get_nb_trainable_parameters()[0]
    est = {m: modelinfo.estimate_memory(info, m, "nf4" if m == "qlora" else "none", 4, 512, 8, 1, False, False)
           for m in ("full", "freeze", "lora", "qlora")}
    assert est["qlora"]["weights"] < est["lora"]["weights"] == est["full"]["weights"]
    assert est["lora"]["states"] < est["freeze"]["states"] < est["full"]["states"]
    assert chatfmt.suggested(path) == "auto" and chatfmt.advice(path, "auto") is None
    assert chatfmt.advice(path, REGISTRY_TEMPLATE[name]) is None and chatfmt.advice(path, "llama3")[0] == "mismatch"
    html = info_html("en", str(path), "lora", "none", 4, 512, 8, 1, False, False)
    assert f"{info.params:,}" in html and f"{info.heads} / {info.kv_heads} KV" in html and "qlora" in html


def test_lora_targets_are_the_familys_linear_layers(family, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.run.checks import check
    from engine.run.config import RunConfig

    name, path = family

    def problems(target: str) -> dict:
        cfg = RunConfig.model_validate({"model": {"path": str(path)}, "method": {"lora_target": target},
                                        "data": {"registry": str(ROOT / "data" / "dataset_info.yaml")},
                                        "output": {"run_dir": str(tmp_path / "run")}})
        return dict(check(cfg))

    assert "method.lora_target" not in problems("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    said = problems("q_proj,query_key_value")["method.lora_target"]
    assert said.startswith(f"{path.name} has no module named query_key_value")
    assert {"q_proj", "gate_proj", "down_proj"} <= set(said.split("its modules: ")[1].split(";")[0].split(", "))

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_extend_vocab_on_the_familys_tokenizer(family):
    from transformers import AutoModelForCausalLM

    from engine.train import vocab

    name, path = family
    demo = ROOT / "data" / "vocab_zh_demo.txt"
    text = "我是 Orion，由 Workbench 团队开发的人工智能助手。请问有什么可以帮您？"
    preview = vocab.preview(path, demo, text)
    assert preview["added"] > 0 and preview["tokens_per_char_after"] < preview["tokens_per_char_before"]

    tok = _tokenizer(path)
    info = vocab.extend_tokenizer(tok, demo, text)
    assert info == {k: preview[k] for k in info}
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # the new tokens decode as text, spacing kept (SentencePiece's ▁ too)
    new_id = tok.convert_tokens_to_ids("团队")
    assert new_id >= info["base_size"] and new_id in ids
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = vocab.resize_embeddings(model, len(tok), known=info["base_size"])
    assert len(rows) == info["added"] and model.get_input_embeddings().weight.shape[0] == len(tok)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == (name != "mistral")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids])).logits).all()


@pytest.mark.parametrize("name, end", [("qwen2", "<|endoftext|>"), ("gemma", "<eos>")])
def test_chat_stops_at_the_models_own_end_tokens(name, end, tmp_path_factory):
    """generation_config.json's eos list (Qwen's <|endoftext|> next to <|im_end|>) ends an answer, not only the
    template's stop token: a model that writes it first answers with nothing and stops."""
    from engine.serve.inference import ChatModel
    from engine.serve.sampling import SamplingParams

    chat = ChatModel.load(str(family_model(tmp_path_factory, name)))
    end_id = chat.tokenizer.convert_tokens_to_ids(end)
    assert end_id in chat.stop_token_ids()
    bias = torch.zeros(len(chat.tokenizer))
    bias[end_id] = 1e4
    chat.model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    result = chat.generate([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_new_tokens=8))
    assert (result.completion_tokens, result.finish_reason, result.text) == (1, "stop", "")


def test_a_legacy_sentencepiece_tokenizer_keeps_its_flag_when_saved(tmp_path):
    """Llama 2's tokenizer_config.json says legacy: true (the text after a special token starts with "▁", as
    sentencepiece and llama.cpp tokenize it); transformers 5 reads the flag but no longer writes it. A tokenizer loaded
    by the engine writes it back, so a checkpoint, final/ or export tokenizes like its base."""
    import json

    from families import train_sentencepiece

    from engine.data.encode import load_tokenizer
    from engine.run.config import ModelConfig

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "tokenizer.model").write_bytes(train_sentencepiece(
        {"unk": ("<unk>", 0), "bos": ("<s>", 1), "eos": ("</s>", 2)}, [], add_dummy_prefix=True))
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    text = "<s>[INST] What is 2 + 2? [/INST]"
    base = load_tokenizer(ModelConfig(path=str(tmp_path / "base")))
    want = base(text, add_special_tokens=False).input_ids
    assert base.convert_ids_to_tokens(want[1]).startswith("▁")  # legacy: "▁[" after <s>
    base.save_pretrained(tmp_path / "saved")
    saved = load_tokenizer(ModelConfig(path=str(tmp_path / "saved")))
    assert saved.legacy is True and saved(text, add_special_tokens=False).input_ids == want
