"""Export on a tiny Llama: merge, verification (an unmerged export must fail), shards, bad inputs, GGUF, hub offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from engine.run import jobs, launch, rundir
from engine.run.config import ConfigError
from engine.jobs.export import export, greedy
from engine.jobs.hub import HubError
from engine.run.jobchecks import ExportError, check_export
from engine.run.jobconfig import ExportConfig


class _Progress:
    def plan(self, total): pass
    def phase(self, text): pass
    def advance(self, n=1, **row): pass


def make_adapter(base: Path, out: Path, seed: int = 1, rank: int = 4) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, saved like a training checkpoint."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    run_cfg = {"model": {"path": str(base), "quantization": "none"}, "method": {"stage": "sft", "finetuning_type": "lora",
               "lora_rank": rank}, "data": {"datasets": ["identity"]}, "training": {"learning_rate": 1e-3}}
    (out / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("run") / "checkpoint-4")


def _cfg(adapter, out, **output) -> ExportConfig:
    return ExportConfig.model_validate({"model": {"checkpoint": str(adapter)},
                                        "output": {"dir": str(out), "job_dir": str(out.parent / "job"), "dtype": "float32", **output}})


def test_merge_matches_adapter_in_fp32_and_is_loadable(adapter, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = export(_cfg(adapter, tmp_path / "merged", max_shard_size="100KB"), tmp_path, _Progress())
    out = Path(result["output_dir"])
    assert result["verify"]["max_logit_diff"] < 1e-4
    assert result["verify"]["base_vs_adapter"] > 1e-2  # the adapter really changes the logits
    assert result["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "README.md", "config.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert str(tiny_model) in card and "identity" in card and "lora" in card and "learning_rate" in card

    # independently of the job: plain transformers loads it and agrees with the adapter model
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(adapter))
    with torch.no_grad():
        assert (merged(ids).logits - peft(ids).logits).abs().max().item() < 1e-4
    assert greedy(merged, tok, ids, 8) == greedy(peft, tok, ids, 8)


def test_unmerged_export_fails_verification(adapter, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())  # drops the adapter
    with pytest.raises(ExportError, match="unmerged"):
        export(_cfg(adapter, tmp_path / "bad"), tmp_path, _Progress())
    assert not (tmp_path / "bad").exists()


def test_bad_inputs_are_reported_before_work(adapter, tiny_model, default_model, tmp_path, monkeypatch):
    missing = ExportConfig.model_validate({"model": {"checkpoint": str(tmp_path / "nope")}, "output": {"dir": str(tmp_path / "o")}})
    assert "checkpoint not found" in check_export(missing)[0][1]

    wrong_base = _cfg(adapter, tmp_path / "o")
    wrong_base.model.base = str(default_model)
    (field, msg), = check_export(wrong_base)
    assert field == "model.base" and "does not match the base model" in msg and "input size 64 vs base 576" in msg

    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("keep me")
    (field, msg), = check_export(_cfg(adapter, full))
    assert field == "output.dir" and "not empty" in msg and "overwrite" in msg

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root can write anyway
            assert any("not writable" in m for _, m in check_export(_cfg(adapter, locked / "out")))
    finally:
        locked.chmod(0o700)

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert any("not enough disk space" in m and "GB" in m for _, m in check_export(_cfg(adapter, tmp_path / "o2")))


def test_hub_push_offline_fails_once_with_a_clear_message(tmp_path, monkeypatch):
    from engine.jobs.hub import push
    from engine.run.jobconfig import ExportHub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline mode is on"):
        push(ExportHub(repo_id="me/model", token="x"), tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(HubError, match="cannot reach .* not retried"):
        push(ExportHub(repo_id="me/model", token="x", endpoint="http://127.0.0.1:9", timeout_s=2), tmp_path)
    with pytest.raises(HubError, match="needs a token"):
        push(ExportHub(repo_id="me/model"), tmp_path)


def test_export_job_through_the_launcher(adapter, tmp_path):
    cfg = _cfg(adapter, tmp_path / "merged")
    cfg.output.job_dir = str(tmp_path / "job")
    job_dir = launch.start(cfg)
    status = launch.wait(job_dir, timeout=240)
    assert status.state == "completed", (status, rundir.log_tail(job_dir))
    result = jobs.read_result(job_dir)
    assert result["verify"]["max_logit_diff"] < 1e-4 and Path(result["output_dir"]).is_dir()
    assert status.step == status.total_steps > 0
    with pytest.raises(ConfigError, match="not empty"):
        launch.start(cfg)
    assert json.loads((job_dir / "status.json").read_text())["kind"] == "export"


# ---------------------------------------------------------------- GGUF

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_small_llama(out: Path, llama3_split: bool = False, tied: bool = True) -> Path:
    """A 2-layer Llama over a 320-token byte-level BPE tokenizer (so GGUF metadata reads fast), with weights and
    a RoPE base that make attention position-dependent: a q/k layout error changes the logits ~1000x the tolerance.
    ``llama3_split``: Llama 3's pre-tokenizer (split regex, then bytes) instead of GPT-2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from engine.jobs.gguf import _LLAMA3_SPLIT

    bpe = Tokenizer(models.BPE(ignore_merges=llama3_split))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]) \
        if llama3_split else pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = ["Who are you? I am Orion, a helpful assistant. In 2024, 12345 users wrote 你好，世界! def f(x): return x**2"] * 20
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, initializer_range=0.1,
                         rope_theta=500.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> Path:
    return make_small_llama(tmp_path_factory.mktemp("small-llama"))


@pytest.fixture(scope="module")
def gguf_export(small_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    adapter = make_adapter(small_llama, tmp / "run" / "checkpoint-4")
    cfg = _cfg(adapter, tmp / "merged", gguf=["f16", "q8_0", "q4_0"])
    return export(cfg, tmp, _Progress())


def test_gguf_files_load_back_in_transformers_and_match_the_merged_model(gguf_export):
    out = Path(gguf_export["output_dir"])
    files = {g["type"]: g for g in gguf_export["gguf"]}
    assert list(files) == ["f16", "q8_0", "q4_0"]
    for g in files.values():
        assert Path(g["path"]).parent == out / "gguf" and g["file_diff"] < 1e-4  # the file holds the merged weights, rounded
    assert files["f16"]["max_logit_diff"] < 1e-2 < files["q4_0"]["max_logit_diff"]
    assert files["f16"]["max_logit_diff"] < files["q8_0"]["max_logit_diff"] < files["q4_0"]["max_logit_diff"]
    assert files["f16"]["tokens_match"] and files["q8_0"]["tokens_match"] and files["f16"]["top1_agreement"] == 1.0
    assert files["f16"]["answer"] == gguf_export["verify"]["answer"]
    assert files["f16"]["bytes"] > files["q8_0"]["bytes"] > files["q4_0"]["bytes"]
    card = (out / "README.md").read_text()
    assert "## GGUF" in card and f"{out.name}-q8_0.gguf" in card


def test_gguf_reader_sees_every_tensor_and_the_metadata(gguf_export, small_llama):
    import gguf

    config = json.loads((small_llama / "config.json").read_text())
    tok = json.loads((small_llama / "tokenizer.json").read_text())
    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                          "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    for g in gguf_export["gguf"]:
        reader = gguf.GGUFReader(g["path"])
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert set(types) == names  # tied embeddings: no output.weight
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.1.ffn_down.weight"] == g["type"].upper()
        assert types["token_embd.weight"] == {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q8_0"}[g["type"]]
        f = {k: v.contents() for k, v in reader.fields.items()}
        assert f["general.architecture"] == "llama" and f["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_0": 2}[g["type"]]
        assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 128)
        assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.rope.dimension_count"]) == (4, 2, 16)
        assert f["llama.rope.freq_base"] == 500.0 and f["llama.context_length"] == 256
        assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
        assert len(f["tokenizer.ggml.tokens"]) == 320 and f["tokenizer.ggml.tokens"][1] == "<|im_start|>"
        assert f["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and f["tokenizer.ggml.token_type"][200] == 1
        assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
        assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"]) == (1, 2, 2)
        assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.chat_template"] == CHATML


def test_a_wrong_gguf_layout_fails_verification_and_is_deleted(small_llama, tmp_path, monkeypatch):
    import engine.jobs.gguf as ge

    monkeypatch.setattr(ge, "permute_rotary", lambda w, n_head: w)  # q/k rows left in the Hugging Face order
    adapter = make_adapter(small_llama, tmp_path / "run" / "checkpoint-2")
    with pytest.raises(ExportError, match="does not hold this model.*safetensors export .* was kept"):
        export(_cfg(adapter, tmp_path / "merged", gguf=["f16"]), tmp_path, _Progress())
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file() and (merged / "README.md").is_file() and not (merged / "gguf").exists()


def test_gguf_llama3_pre_tokenizer_and_untied_head(tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.jobs.export import _prompt_ids
    from engine.jobs.gguf import pre_tokenizer, verify_gguf, write_gguf

    model_dir = make_small_llama(tmp_path / "m", llama3_split=True, tied=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert pre_tokenizer(json.loads((model_dir / "tokenizer.json").read_text())) == "llama-bpe"
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = _prompt_ids(tok, "Who are you? In 12345 words.")
    path = write_gguf(model_dir, tmp_path / "gguf" / "m-q8_0.gguf", "q8_0")
    checked = verify_gguf(path, "q8_0", tok, reference, ids, greedy(reference, tok, ids, 8))
    assert checked["file_diff"] < 1e-4 and checked["top1_agreement"] == 1.0
    assert "output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}  # untied head written


def test_gguf_refuses_unsupported_models_before_work(adapter, tiny_model, tmp_path):
    from engine.jobs.gguf import gguf_problems

    assert check_export(_cfg(adapter, tmp_path / "o", gguf=["q8_0"])) == []  # the default tokenizer is supported
    cases = {
        "qwen": ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, None,
                 ["supports Llama-architecture models (LlamaForCausalLM)", "qwen is Qwen2ForCausalLM"]),
        "rope": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, None,
                 ["default RoPE only", "rope_type 'llama3'"]),
        "bias": ({"attention_bias": True}, None, ["attention_bias=true", "bias/config.json"]),
        "digits": ({}, {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                              {"type": "ByteLevel", "add_prefix_space": False,
                                                               "trim_offsets": True, "use_regex": True}]},
                   ["GPT-2 or Llama 3 pre-tokenization", "digits/tokenizer.json pre-tokenizes with Digits + ByteLevel"]),
    }
    for name, (config_patch, pre, messages) in cases.items():
        d = tmp_path / name
        shutil.copytree(tiny_model, d)
        config = json.loads((d / "config.json").read_text()) | config_patch
        (d / "config.json").write_text(json.dumps(config))
        if pre:
            tj = json.loads((d / "tokenizer.json").read_text()) | {"pre_tokenizer": pre}
            (d / "tokenizer.json").write_text(json.dumps(tj))
        problems = gguf_problems(d)
        assert len(problems) == 1 and all(m in problems[0] for m in messages), (name, problems)
    (tmp_path / "rope" / "tokenizer.json").unlink()
    assert any("needs a fast tokenizer" in m for m in gguf_problems(tmp_path / "rope"))
    digits_adapter = make_adapter(tmp_path / "digits", tmp_path / "digits-run" / "checkpoint-1")
    (field, msg), = check_export(_cfg(digits_adapter, tmp_path / "o2", gguf=["f16"]))
    assert field == "output.gguf" and "Digits + ByteLevel" in msg


@pytest.mark.slow
def test_default_model_lora_export_with_gguf_q8_0(default_model, tmp_path):
    """The real tokenizer (49k tokens, SmolLM2's special tokens and chat template) and 30 layers through q8_0."""
    adapter = make_adapter(default_model, tmp_path / "run" / "checkpoint-1", rank=8)
    cfg = _cfg(adapter, tmp_path / "orion", dtype="bfloat16", gguf=["q8_0"])
    cfg.verify.max_new_tokens = 16
    result = export(cfg, tmp_path, _Progress())
    (g,) = result["gguf"]
    print(f"export {result['seconds']} s, safetensors {result['safetensors_bytes'] / 1e6:.1f} MB; GGUF q8_0 {g['seconds']} s, "
          f"{g['bytes'] / 1e6:.1f} MB, max logit diff {g['max_logit_diff']:.3g}, top-1 {g['top1_agreement']:.0%}, "
          f"greedy same {g['tokens_match']}, file vs. rounded merged {g['file_diff']:.3g}")
    assert 140e6 < g["bytes"] < 150e6  # 135M parameters at 34 bytes per 32, norms in f32
    assert g["file_diff"] < 1e-3 and g["top1_agreement"] >= 0.9 and g["max_logit_diff"] < 3.0
