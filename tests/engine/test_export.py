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


# ---------------------------------------------------------------- GGUF (llama.cpp's converter and quantizer)

def _needs_llama_cpp():
    pytest.importorskip("llama_cpp", reason="the [gguf] extra (make gguf) is not installed")
    from engine.jobs.gguf import tools_problem

    if tools_problem():
        pytest.skip(tools_problem())


@pytest.fixture(scope="module")
def gguf_export(tiny_model, tmp_path_factory):
    """The tiny Llama (the default model's tokenizer and ChatML template) exported in float16 with a 16-bit file,
    one from the converter's own Q8_0 path (the quantizer) and a K-quant."""
    _needs_llama_cpp()
    tmp = tmp_path_factory.mktemp("gguf")
    adapter = make_adapter(tiny_model, tmp / "run" / "checkpoint-4")
    cfg = _cfg(adapter, tmp / "merged", dtype="float16", gguf=["f16", "q8_0", "q4_k_m"])
    cfg.verify.max_new_tokens = 8
    return export(cfg, tmp / "job", _Progress())


def test_gguf_files_load_in_llama_cpp_and_match_the_merged_model(gguf_export):
    out = Path(gguf_export["output_dir"])
    files = {g["type"]: g for g in gguf_export["gguf"]}
    assert list(files) == ["f16", "q8_0", "q4_k_m"]
    for g in files.values():
        assert Path(g["path"]).parent == out / "gguf" and g["max_logit_diff"] <= g["expected_loss"]
    assert sorted(p.name for p in (out / "gguf").iterdir()) == sorted(
        f"merged-{q}.{ext}" for q in files for ext in ("gguf", "Modelfile"))  # no leftover source or .part file
    assert files["f16"]["max_logit_diff"] < 0.05 and files["f16"]["top1_agreement"] == 1.0 and files["f16"]["tokens_match"]
    assert files["f16"]["max_logit_diff"] < files["q8_0"]["max_logit_diff"] < files["q4_k_m"]["max_logit_diff"]
    assert files["f16"]["answer"] == gguf_export["verify"]["answer"]
    assert files["f16"]["bytes"] > files["q8_0"]["bytes"] > files["q4_k_m"]["bytes"]
    card = (out / "README.md").read_text()
    assert "## GGUF" in card and "merged-q4_k_m.gguf" in card and "ollama create merged:q4_k_m -f " in card


@pytest.mark.slow
def test_gguf_metadata_types_and_modelfile(gguf_export, tiny_model):
    import gguf

    from engine.jobs.ollama import read_modelfile, render_ollama

    tok_cfg = json.loads((tiny_model / "tokenizer_config.json").read_text())
    template = (tiny_model / "chat_template.jinja").read_text() if (tiny_model / "chat_template.jinja").is_file() \
        else tok_cfg["chat_template"]
    for g in gguf_export["gguf"]:
        reader = gguf.GGUFReader(g["path"])
        f = {k: v.contents() for k, v in reader.fields.items()}
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
        assert f["tokenizer.ggml.pre"] == "smollm" and f["tokenizer.chat_template"] == template
        assert f["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_k_m": 15}[g["type"]]
        # hidden 64 is no multiple of a K-quant's 256-weight block: the quantizer falls back to a legacy type
        assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.1.ffn_up.weight"] == \
            {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q5_0"}[g["type"]]
        mf = read_modelfile(Path(g["ollama"]["path"]))
        assert mf["FROM"] == [f"./{Path(g['path']).name}"] and g["ollama"]["template"] == "chatml"
        assert mf["SYSTEM"] == ["You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
        assert 'stop "<|im_end|>"' in mf["PARAMETER"] and "num_ctx 2048" in mf["PARAMETER"]
        text = render_ollama(mf["TEMPLATE"][0], [{"role": "user", "content": "Hi 你好 🙂"}], mf["SYSTEM"][0])
        assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nHi 你好 🙂<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_a_wrong_gguf_fails_verification_and_is_deleted(tiny_model, tmp_path, monkeypatch):
    """A converter that writes another model's weights: the logits check catches it, the file goes, the export stays."""
    _needs_llama_cpp()
    import engine.jobs.gguf as ge

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    torch.manual_seed(7)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(other)
    real = ge.convert
    monkeypatch.setattr(ge, "convert", lambda model_dir, path, outtype, log: real(other, path, outtype, log))
    adapter = make_adapter(tiny_model, tmp_path / "run" / "checkpoint-2")
    with pytest.raises(ExportError, match="does not hold this model.*safetensors export .* was kept"):
        export(_cfg(adapter, tmp_path / "merged", dtype="float16", gguf=["f16"]), tmp_path / "job", _Progress())
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file() and (merged / "README.md").is_file() and not (merged / "gguf").exists()


def test_gguf_refusals_come_before_work(adapter, tiny_model, tmp_path, monkeypatch):
    import engine.jobs.gguf as ge
    from engine.jobs.gguf import gguf_problems

    if ge.tools_problem() is None:
        assert check_export(_cfg(adapter, tmp_path / "o", gguf=["q4_k_m"])) == []
        d = tmp_path / "rwkv"
        shutil.copytree(tiny_model, d)
        (d / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text())
                                                  | {"architectures": ["NoSuchForCausalLM"]}))
        (msg,) = gguf_problems(d)
        assert "does not support NoSuchForCausalLM" in msg and "rwkv/config.json" in msg
    # not installed: the check names the command that installs it, before a checkpoint is even chosen
    monkeypatch.setenv("WORKBENCH_LLAMA_CPP_DIR", str(tmp_path / "nowhere"))
    problems = check_export(ExportConfig.model_validate({"output": {"gguf": ["q8_0"]}}))
    assert problems[0][0] == "output.gguf" and "workbench gguf-setup" in problems[0][1]
    assert problems[1][0] == "model.checkpoint"
    monkeypatch.setattr(ge.importlib.util, "find_spec", lambda name: None)
    (field, msg), _ = check_export(ExportConfig.model_validate({"output": {"gguf": ["q8_0"]}}))
    assert field == "output.gguf" and "pip install -e '.[gguf]'" in msg and "not installed" in msg
    # `workbench export` and the Export tab prepare through the same checks: refused, nothing created
    cfg = _cfg(adapter, tmp_path / "o3", gguf=["q8_0"])
    with pytest.raises(ConfigError) as err:
        launch.prepare(cfg)
    assert any(f == "output.gguf" and "pip install" in m for f, m in err.value.problems)
    assert not (tmp_path / "job").exists() and not (tmp_path / "o3").exists()


def _gguf_metadata(path: Path) -> dict:
    from transformers.integrations.gguf.reader import read_gguf_metadata  # fast on a 151k vocabulary; gguf-py is not

    return read_gguf_metadata(str(path))[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma", "qwen2", "mistral"])  # llama: the tiny_model tests above
def test_gguf_families_convert_load_and_verify(family, tmp_path_factory, tmp_path):
    """Each family through llama.cpp's converter (byte-level BPE and SentencePiece tokenizers, biases, untied heads,
    Gemma's scaled embeddings) and quantizer, loaded in llama.cpp: the same ids for the chat-rendered sample, the same
    chat template, logits within the expected loss, a Modelfile whose template renders like the Jinja one. Qwen2 and
    Mistral have real vocabularies (llama.cpp's test vocabularies: Qwen2's, and the Llama/Mistral 7B v0.1
    SentencePiece set up as Mistral 7B Instruct v0.1/v0.2 ship it), which llama.cpp knows as it knows a user's."""
    _needs_llama_cpp()
    from families import family_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.jobs.export import _prompt_ids
    from engine.jobs.gguf import add_tokens_decoder, check_vocab, convert, quantize, tokenizer_test_vocab, verify_gguf
    from engine.jobs.ollama import read_modelfile, render_ollama, write_modelfile

    real = family != "gemma"
    vocab = tokenizer_test_vocab({"qwen2": "qwen2", "mistral": "llama-spm"}[family]) if real else None
    if real and vocab is None:
        pytest.skip("llama.cpp's test vocabularies are not unpacked (workbench gguf-setup unpacks them)")
    model_dir = Path(shutil.copytree(family_model(tmp_path_factory, family, real_vocab=real), tmp_path / family))
    add_tokens_decoder(model_dir)  # as the export writes it (transformers 5 leaves it out)
    check_vocab(model_dir, model_dir, tmp_path)  # Qwen2's pre-tokenizer is one llama.cpp's converter knows
    tok = AutoTokenizer.from_pretrained(model_dir)
    if real:  # the ids the real model's own tokenizer gives llama.cpp's test texts (spaces, digits, CJK, emoji, code)
        texts = Path(f"{vocab}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
        expected = Path(f"{vocab}.out").read_text(encoding="utf-8").splitlines()
        assert len(expected) > 40 and [t for t, e in zip(texts, expected) if tok(
            t, add_special_tokens=False).input_ids != [int(i) for i in e.split()]] == []
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = _prompt_ids(tok, "Who are you? In 12345 words.")
    with torch.no_grad():
        ref = reference(input_ids=ids).logits[0].numpy()
    ref_tokens = greedy(reference, tok, ids, 6)
    f16 = convert(model_dir, tmp_path / "gguf" / f"{family}-f16.gguf", "f16", tmp_path / "convert.log")
    q4 = quantize(f16, tmp_path / "gguf" / f"{family}-q4_k_m.gguf", "q4_k_m")
    meta = _gguf_metadata(f16)
    assert meta["tokenizer.ggml.model"] == {"gemma": "llama", "qwen2": "gpt2", "mistral": "llama"}[family]
    assert meta["tokenizer.ggml.pre"] == {"gemma": "default", "qwen2": "qwen2", "mistral": "default"}[family]
    assert meta["tokenizer.chat_template"] == tok.chat_template
    for path, qtype in ((f16, "f16"), (q4, "q4_k_m")):
        checked = verify_gguf(path, qtype, tok, ref, ids[0].tolist(), ref_tokens)
        assert checked["max_logit_diff"] <= checked["expected_loss"] and checked["tokenizer_note"] is None, checked
        if qtype == "f16":
            assert checked["top1_agreement"] == 1.0 and checked["tokens_match"], checked
    add_bos = checked["add_bos"]
    assert add_bos == (family != "qwen2")
    info = write_modelfile(f16, model_dir, tok, add_bos=add_bos)
    assert info["template"] == {"gemma": "gemma", "qwen2": "chatml", "mistral": "mistral"}[family]
    mf = read_modelfile(Path(info["path"]))
    conv = [{"role": "user", "content": "Hi 你好 🙂"}, {"role": "assistant", "content": "Hello! 42"},
            {"role": "user", "content": "def f(x): return x"}]
    jinja = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    jinja = jinja[len(tok.bos_token):] if add_bos else jinja  # llama.cpp adds the BOS itself
    assert render_ollama(mf["TEMPLATE"][0], conv, (mf.get("SYSTEM") or [""])[0]) == jinja


@pytest.mark.slow
def test_gguf_of_a_mistral_v03_style_tokenizer_verifies_with_a_note(tmp_path_factory, tmp_path):
    """[INST]/[/INST] as control tokens and legacy=False (Mistral v0.3's tokenizer; the small mistral family):
    llama.cpp starts the text after each special token with SentencePiece's dummy-prefix space ("[INST] Who" as
    "▁▁Who"), transformers does not ("▁Who", as mistral_common encodes a v3 instruction). The file's vocabulary is
    the model's, so the verification passes and says so, instead of refusing every Mistral v0.3 export."""
    _needs_llama_cpp()
    from families import family_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.jobs.export import _prompt_ids
    from engine.jobs.gguf import add_tokens_decoder, convert, verify_gguf

    model_dir = Path(shutil.copytree(family_model(tmp_path_factory, "mistral"), tmp_path / "mistral"))
    add_tokens_decoder(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.added_tokens_encoder.keys() >= {"[INST]", "[/INST]"}
    assert json.loads((model_dir / "tokenizer.json").read_text())["pre_tokenizer"]["prepend_scheme"] == "first"
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = _prompt_ids(tok, "Who are you?")
    with torch.no_grad():
        ref = reference(input_ids=ids).logits[0].numpy()
    f16 = convert(model_dir, tmp_path / "mistral-f16.gguf", "f16", tmp_path / "convert.log")
    checked = verify_gguf(f16, "f16", tok, ref, ids[0].tolist(), greedy(reference, tok, ids, 4))
    assert "dummy-prefix space after special tokens" in checked["tokenizer_note"], checked
    assert checked["max_logit_diff"] <= checked["expected_loss"]


def test_gguf_refuses_an_unknown_pre_tokenizer_before_weights_load(tmp_path_factory, tmp_path):
    """The small qwen2 family (the SmolLM vocabulary under Qwen2's pre-tokenizer) is a tokenizer llama.cpp's
    converter does not know: the vocabulary pass refuses it with the converter's reason, no weights read."""
    _needs_llama_cpp()
    from families import family_model

    from engine.jobs.gguf import GGUFError, check_vocab

    with pytest.raises(GGUFError, match="pre-tokenizer was not recognized"):
        check_vocab(family_model(tmp_path_factory, "qwen2"), family_model(tmp_path_factory, "qwen2"), tmp_path)
