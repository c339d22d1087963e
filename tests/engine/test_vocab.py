"""Vocabulary extension: token sources, the extended tokenizer, mean-initialised embeddings, and one real
DeepSpeed-launched LoRA run whose checkpoint chat, plain transformers + peft, and export all reload."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from engine.run import launch, rundir
from engine.train import vocab
from engine.run.checks import check
from engine.run.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "vocab_zh_demo.txt"
ZH = "我是 Orion，由 Workbench 团队开发的人工智能助手。请问有什么可以帮您？"


def _cfg(tiny_model, run_dir, **sections) -> RunConfig:
    data = {
        "model": {"path": str(tiny_model), "extend_vocab": str(DEMO)},
        "data": {"datasets": ["identity"], "registry": str(ROOT / "data" / "dataset_info.yaml"), "cutoff_len": 256},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                     "learning_rate": 5e-3, "save_steps": 1, "logging_steps": 1, "precision": "fp32"},
        "output": {"run_dir": str(run_dir)},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return RunConfig.model_validate(data)


# ---------------------------------------------------------------- token sources and the tokenizer


def test_token_list_file(tmp_path):
    f = tmp_path / "tokens.txt"
    f.write_text("团队\n\n  开发 \n团队\nNew York\n", encoding="utf-8")
    assert vocab.read_tokens(f) == ["团队", "开发", "New York"]
    with pytest.raises(vocab.VocabError, match="not found"):
        vocab.read_tokens(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(vocab.VocabError, match="no tokens"):
        vocab.read_tokens(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes("团队\n".encode() + b"\xff\xfe\n")
    with pytest.raises(vocab.VocabError, match="line 2"):
        vocab.read_tokens(tmp_path / "bad.txt")


@pytest.fixture(scope="module")
def zh_corpus(tmp_path_factory) -> Path:
    rows = json.loads((ROOT / "data" / "identity.json").read_text(encoding="utf-8"))
    text = "\n".join(r["instruction"] + " " + r["output"] for r in rows) * 5
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_merge_a_tokenizers_and_a_sentencepiece_vocabulary(zh_corpus, default_model, tmp_path):
    import sentencepiece as spm
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train([str(zh_corpus)], trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"]))
    (tmp_path / "hf").mkdir()
    bpe.save(str(tmp_path / "hf" / "tokenizer.json"))
    spm.SentencePieceTrainer.train(input=str(zh_corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   character_coverage=1.0, minloglevel=2)
    assert vocab.read_tokens(tmp_path / "hf") == vocab.read_tokens(tmp_path / "hf" / "tokenizer.json")
    base = AutoTokenizer.from_pretrained(default_model)
    for source in (tmp_path / "hf", tmp_path / "sp.model"):
        tokens = vocab.read_tokens(source)
        # only pieces of unspaced scripts: an English piece would be matched inside other words
        assert tokens and all(vocab._unspaced(t) for t in tokens), (source, tokens[:20])
        assert any(len(t) > 1 for t in tokens) and "[UNK]" not in tokens
        tok = copy.deepcopy(base)
        info = vocab.extend_tokenizer(tok, source)
        assert info["added"] + info["present"] == len(tokens) and info["added"] > 0
        assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in tokens)


def test_extend_tokenizer_adds_normal_tokens_used_in_encoding(default_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    source = tmp_path / "t.txt"
    source.write_text("团队\n人工智能\nthe\n是\n", encoding="utf-8")  # "the" and 是 are single tokens already
    info = vocab.extend_tokenizer(tok, source, ZH)
    assert (info["tokens"], info["added"], info["present"]) == (4, 2, 2)
    assert info["size"] == info["base_size"] + 2 == len(tok)
    assert info["tokens_per_char_after"] < info["tokens_per_char_before"]
    ids = tok(ZH, add_special_tokens=False)["input_ids"]
    for word in ("团队", "人工智能"):
        new_id = tok.convert_tokens_to_ids(word)
        assert new_id >= info["base_size"] and tok(word, add_special_tokens=False)["input_ids"] == [new_id]
        assert new_id in ids  # used when encoding running text, not only alone
    assert tok.decode(ids) == ZH
    assert not any(t.special for t in tok.added_tokens_decoder.values() if t.content in ("团队", "人工智能"))


def test_demo_list_tokens_are_all_new_and_lower_tokens_per_char(default_model):
    cfg = RunConfig()
    info = vocab.preview(default_model, DEMO, vocab.sample_text(cfg.data))
    assert info["tokens"] == info["added"] > 300 and info["present"] == 0
    assert info["tokens_per_char_after"] < 0.8 * info["tokens_per_char_before"], info
    # a dataset that cannot be read is left to the data loading to report
    assert vocab.sample_text(cfg.data.model_copy(update={"datasets": ["no-such-data", "identity"]})) == vocab.sample_text(cfg.data)


def test_checks_name_the_field(tiny_model, tmp_path):
    def problems(source):
        return [m for f, m in check(_cfg(tiny_model, tmp_path / "run", model={"extend_vocab": str(source)}))
                if f == "model.extend_vocab"]

    assert any("not found" in m for m in problems(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    assert any("no tokens" in m for m in problems(tmp_path / "empty.txt"))
    (tmp_path / "dir").mkdir()
    assert any("without a tokenizer" in m for m in problems(tmp_path / "dir"))
    (tmp_path / "present.txt").write_text("the\n")  # already one token: skipped at train time, not an error
    assert problems(tmp_path / "present.txt") == [] and problems(DEMO) == []


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_the_mean_of_the_old(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    ids = vocab.resize_embeddings(model, 110, known=96)  # ids 96..99 exist already (spare rows), 100..109 are new
    assert list(ids) == list(range(96, 110)) and model.config.vocab_size == 110
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape == head.shape == (110, 16)
    assert (emb[:96] == old_in[:96]).all() and (head[:96] == old_out[:96]).all()
    assert torch.allclose(emb[96:], old_in[:96].mean(0).expand(14, -1))
    assert torch.allclose(head[96:], old_out[:96].mean(0).expand(14, -1))
    assert (emb is head) == tied
    assert len(vocab.resize_embeddings(model, 105)) == 0  # a tokenizer no longer than the matrix: nothing to do


# ---------------------------------------------------------------- one real run, then every way of loading it


@pytest.fixture(scope="module")
def vocab_run(tiny_model, tmp_path_factory) -> Path:
    run_dir = launch.start(_cfg(tiny_model, tmp_path_factory.mktemp("vocab") / "run"))
    status = launch.wait(run_dir, timeout=300)
    assert status is not None and status.state == "completed", (status, rundir.log_tail(run_dir))
    return run_dir


def _adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def test_run_saves_extended_tokenizer_and_trained_embeddings(vocab_run, tiny_model):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    base = len(AutoTokenizer.from_pretrained(tiny_model))
    n_new = len(vocab.read_tokens(DEMO))
    for ckpt in ("checkpoint-1", "checkpoint-2", "final"):
        tok = AutoTokenizer.from_pretrained(vocab_run / ckpt)
        assert len(tok) == base + n_new, ckpt
        assert tok("团队", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("团队")]
        tensors = _adapter_tensors(vocab_run / ckpt)
        full = {k: v.shape for k, v in tensors.items() if "lora_" not in k}
        # only the trained embed_tokens / lm_head, at the new size (no copies of the resized base matrices)
        assert sorted(full) == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"], full
        assert all(s[0] == base + n_new for s in full.values())
    log = (vocab_run / "train.log").read_text()
    line = next(json.loads(l.split("vocabulary: ", 1)[1]) for l in log.splitlines() if "engine.train: vocabulary: " in l)
    assert line["added"] == n_new and line["tokens_per_char_after"] < line["tokens_per_char_before"]
    assert '"vocab": {' in next(l for l in log.splitlines() if "engine.train: data: " in l)

    # trained: the new rows moved away from their initial value, the mean of the base rows
    mean = load_file(tiny_model / "model.safetensors")["model.embed_tokens.weight"].mean(0)
    trained = _adapter_tensors(vocab_run / "final")
    emb = trained["base_model.model.model.embed_tokens.weight"]
    assert torch.equal(emb, trained["base_model.model.lm_head.weight"])  # the tied model stays tied
    used = [AutoTokenizer.from_pretrained(vocab_run / "final").convert_tokens_to_ids(w) for w in ("团队", "人工智能", "助手")]
    assert all((emb[i] - mean).abs().max() > 1e-3 for i in used)
    first = _adapter_tensors(vocab_run / "checkpoint-1")["base_model.model.model.embed_tokens.weight"]
    assert not torch.equal(first[base:], emb[base:])


def test_chat_and_plain_peft_reload_agree(vocab_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.serve.inference import ChatModel

    chat = ChatModel.load(str(vocab_run / "final"))
    assert len(chat.tokenizer) == chat.model.get_input_embeddings().weight.shape[0]
    from engine.serve.sampling import SamplingParams

    answer = chat.generate([{"role": "user", "content": "你是谁？"}], SamplingParams(max_new_tokens=8))
    assert answer.completion_tokens > 0 and answer.prompt_tokens > 0

    tok = AutoTokenizer.from_pretrained(vocab_run / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    plain = PeftModel.from_pretrained(base, str(vocab_run / "final")).eval()
    ids = tok(ZH, return_tensors="pt").input_ids
    assert (ids >= 49152).any()
    with torch.no_grad():
        a, b = chat.model(ids).logits, plain(ids).logits
    assert (a - b).abs().max().item() < 1e-5


def test_export_of_an_extended_run(vocab_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.jobs.export import export
    from engine.run.jobconfig import ExportConfig

    class Progress:
        def plan(self, total): pass
        def phase(self, text): pass
        def advance(self, n=1, **row): pass

    cfg = ExportConfig.model_validate({"model": {"checkpoint": str(vocab_run / "final")},
                                       "verify": {"prompt": ZH},
                                       "output": {"dir": str(tmp_path / "merged"), "job_dir": str(tmp_path / "job"), "dtype": "float32"}})
    result = export(cfg, tmp_path, Progress())
    assert result["verify"]["max_logit_diff"] < 1e-4 and result["verify"]["base_vs_adapter"] > 1e-3
    out = Path(result["output_dir"])
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.vocab_size == len(tok) == len(AutoTokenizer.from_pretrained(vocab_run / "final"))
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
