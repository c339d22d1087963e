"""Smaller pieces: model facts without loading weights, the Start preview, the status card, the app itself."""

from __future__ import annotations

import re

import shlex
from dataclasses import replace

import pytest
import yaml

from engine.run.config import RunConfig
from engine.run.hardware import computes_in_16_bits
from webui import modelinfo, views
from webui.metrics import MetricSeries
from webui.runs import Device, RunInfo, RunManager


def test_parameter_count_from_safetensors_headers_matches_torch(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    info = modelinfo.inspect_model(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert info.params == sum(p.numel() for p in model.parameters())
    assert (info.layers, info.hidden, info.heads, info.kv_heads) == (2, 64, 4, 2)
    assert info.chat_template  # saved with the default model's tokenizer


def test_parameter_count_without_safetensors_uses_config_arithmetic(tiny_model, tmp_path):
    import shutil

    for name in ("config.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, tmp_path / name)
    counted = modelinfo.inspect_model(tiny_model).params
    estimated = modelinfo.inspect_model(tmp_path).params
    assert estimated == pytest.approx(counted, rel=0.01)  # only the norms are left out


def test_memory_estimate_orders_the_methods(default_model):
    info = modelinfo.inspect_model(default_model)
    assert info.params == 134_515_008
    est = {m: modelinfo.estimate_memory(info, m, "nf4" if m == "qlora" else "none", 4, 512, 8, 2, False, False)
           for m in ("full", "freeze", "lora", "qlora")}
    assert est["qlora"]["weights"] < est["lora"]["weights"] == est["full"]["weights"]
    assert est["lora"]["states"] < est["freeze"]["states"] < est["full"]["states"]
    assert modelinfo.lora_params(info, 8) == 2_442_240  # what peft reports for all-linear r=8 on this model


def test_memory_estimate_keeps_what_training_keeps(default_model):
    """The Model tab's activations per token and layer are what the engine's probe measures on the model as it trains
    (LoRA, cheap parts recomputed; the probe also counts the LoRA outputs and the rotary tables); with 'auto' and a
    budget the total is the budget, between checkpointing nothing and every layer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.train.activations import probe, recompute_cheap_parts

    info = modelinfo.inspect_model(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    recompute_cheap_parts(model)
    assert modelinfo.kept_bytes(info, half=False) == modelinfo.kept_per_token_layer(info) * 4
    assert modelinfo.kept_bytes(info, half=False) == pytest.approx(probe(model), rel=0.04)
    args = (info, "lora", "none", 4, 512, 8, 2)
    off, on = (modelinfo.estimate_memory(*args, gc, False)["total"] for gc in ("off", "on"))
    assert on < off == modelinfo.estimate_memory(*args, "auto", False)["total"]
    assert modelinfo.estimate_memory(*args, "auto", False, memory_gb=3.0)["total"] * 2**30 / 1e9 == pytest.approx(3.0)
    assert modelinfo.estimate_memory(*args, "auto", False, memory_gb=0.5)["total"] == on  # nothing fits: every layer


def test_memory_estimate_in_bf16_on_a_cpu(default_model):
    """A bf16 LoRA run on a CPU (what precision auto picks where the CPU has bf16 units) loads its frozen base in
    bf16 and keeps bf16 activations: the estimate follows the engine's probe of that run, and the precision is
    resolved as the rank resolves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.train.activations import fused_lora, probe, recompute_cheap_parts

    info = modelinfo.inspect_model(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    recompute_cheap_parts(model)
    fused_lora(model)
    assert modelinfo.kept_bytes(info, half=True) == pytest.approx(probe(model, autocast=torch.bfloat16), rel=0.04)
    args = (info, "lora", "none", 4, 512, 8, 2, "off", False)
    fp32, bf16 = modelinfo.estimate_memory(*args, half=False), modelinfo.estimate_memory(*args, half=True)
    assert bf16["weights"] == pytest.approx(fp32["weights"] / 2) and bf16["states"] == fp32["states"]  # fp32 adapters
    assert bf16["activations"] < 0.7 * fp32["activations"]
    full = (info, "full", "none", 4, 512, 8, 2, "off", False)
    assert modelinfo.estimate_memory(*full, half=True)["weights"] == modelinfo.estimate_memory(*full)["weights"]
    assert modelinfo.estimate_memory(*args) == fp32  # a CPU run computes in fp32 unless told otherwise
    amx, avx2 = {"avx512f", "avx512_bf16", "amx_bf16"}, {"avx2", "fma"}
    assert computes_in_16_bits("auto", False, amx) and not computes_in_16_bits("auto", False, avx2)
    assert computes_in_16_bits("auto", True, avx2) and computes_in_16_bits("bf16", False, avx2)
    assert not computes_in_16_bits("fp32", True, amx)


def test_model_path_validation(tmp_path):
    with pytest.raises(modelinfo.ModelPathError, match="not found"):
        modelinfo.resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(modelinfo.ModelPathError, match="not a directory"):
        modelinfo.resolve_model_path(str(tmp_path / "file"))
    with pytest.raises(modelinfo.ModelPathError, match="config.json"):
        modelinfo.resolve_model_path(str(tmp_path))
    with pytest.raises(modelinfo.ModelPathError):
        modelinfo.resolve_model_path("  ")
    assert modelinfo.resolve_model_path("models/SmolLM2-135M-Instruct").is_absolute()


def test_preview_is_the_config_and_command_start_would_use(tiny_model, tmp_path):
    from webui.context import Context
    from webui.tabs.train import preview

    ctx = Context(manager=RunManager(tmp_path / "ws", devices=[Device("cpu", "CPU")]), defaults=RunConfig())
    cfg = RunConfig()
    cfg.model.path = str(tiny_model)
    text, cmd, problems = preview(ctx, cfg)
    assert problems == []
    shown = RunConfig.model_validate(yaml.safe_load(text))
    assert shown.model.path == str(tiny_model) and shown.output.run_dir.startswith(str(tmp_path / "ws" / "runs"))
    argv = shlex.split(cmd)
    assert argv[-1] == f"{shown.output.run_dir}/config.yaml" and "engine.train" in argv
    assert argv[argv.index("--master_port") + 1] == "AUTO"
    cfg.data.datasets = ["no_such_dataset"]
    assert any("no_such_dataset" in p for p in preview(ctx, cfg)[2])


def test_preview_shows_the_multi_node_launch_line(tiny_model, tmp_path):
    from webui.context import Context
    from webui.tabs.train import preview

    ctx = Context(manager=RunManager(tmp_path / "ws", devices=[Device("cpu", "CPU")]), defaults=RunConfig())
    cfg = RunConfig.model_validate({"model": {"path": str(tiny_model)}, "distributed": {
        "nodes": [{"host": "node-a", "slots": 2}, {"host": "node-b", "slots": 2}], "include": "node-a@node-b:1",
        "zero_stage": 2, "master_addr": "10.0.0.1"}})
    _, cmd, problems = preview(ctx, cfg)
    assert problems == []
    run_dir = shlex.split(cmd)[-1].rsplit("/", 1)[0]
    assert f"--hostfile {run_dir}/hostfile --include node-a:0,1@node-b:1 --master_addr 10.0.0.1 --master_port AUTO" in cmd


def test_run_card_exposes_progress_for_people_and_tests(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 1.5, "tokens_per_s": 99.0, "eta_s": 30, "time": 0}\n')
    series = MetricSeries(tmp_path)
    series.update()
    info = RunInfo(id="r1", path=tmp_path, state="running", step=2, total_steps=8, last_loss=1.5, started_at=100.0,
                   model="m", datasets=["identity"], method="lora", devices=("cpu",), batch=("tokens", 2048))
    html = views.run_card("en", info, series, now=160.0)
    for attr in ('data-state="running"', 'data-step="2"', 'data-total="8"', 'data-points="1"', "width:25.00%",
                 '<b data-k="batch">≤ 2,048 tokens</b>'):
        assert attr in html
    assert "1:00" in html and "1.5000" in html  # elapsed, loss
    assert '<b data-k="batch">≤ 2,048 个 token</b>' in views.run_card("zh", info, series, now=160.0)
    for batch, en, zh in ((("examples", 4), "4 examples", "4 个样本"), (("examples", 1), "1 example", "1 个样本")):
        assert f'<b data-k="batch">{en}</b>' in views.run_card("en", replace(info, batch=batch), series, now=160.0)
        assert f'<b data-k="batch">{zh}</b>' in views.run_card("zh", replace(info, batch=batch), series, now=160.0)
    failed = views.run_card("zh", RunInfo(id="r1", path=tmp_path, state="failed", error="boom <x>",
                                          error_kind="out_of_memory"), None)
    assert "内存不足" in failed and "boom &lt;x&gt;" in failed  # the cause, translated kind, escaped


def test_run_card_shows_world_size_and_nodes(tmp_path):
    from webui.runs import _node_info

    cfg = RunConfig.model_validate({"distributed": {"nodes": [{"host": "node-a", "slots": 2}, {"host": "node-b", "slots": 2}],
                                                    "include": "node-a@node-b:1"}})
    info = RunInfo(id="r1", path=tmp_path, state="running", devices=("cpu",), **_node_info(cfg))
    assert "3 ranks on node-a:0,1, node-b:1" in views.run_card("en", info, None, now=1.0)
    assert "3 个进程，节点 node-a:0,1, node-b:1" in views.run_card("zh", info, None, now=1.0)
    assert _node_info(RunConfig()) == {"world_size": 1}


def test_the_app_builds_with_every_tab(tmp_path):
    import gradio as gr

    from webui.app import build_app
    from webui.context import Context
    from webui.form import form_keys, load_defaults

    ctx = Context(manager=RunManager(tmp_path / "ws", devices=[Device("cpu", "CPU")]), defaults=load_defaults())
    demo = build_app(ctx)
    assert isinstance(demo, gr.Blocks)
    assert set(ctx.fields) == set(form_keys())
    labels = {b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)}
    assert {"Model", "Data", "Hyperparameters", "Train", "Runs"} <= labels
    # a box filled on page load and on edits has one listener for both, so the two answers cannot race
    # (a slow page-load answer for the default model once landed over the answer for a typed path)
    config = demo.get_config_file()
    ids = {b.elem_id: i for i, b in demo.blocks.items() if getattr(b, "elem_id", None)}
    for box in ("model-info-box", "data-preview", "template-warning"):
        writers = [d for d in config["dependencies"] if ids[box] in d["outputs"]
                   and any(event in ("load", "change") for _, event in d["targets"])]
        assert len(writers) == 1 and (demo._id, "load") in writers[0]["targets"], box
        assert writers[0]["trigger_mode"] == "always_last"
    updates = ctx.language_updates("zh")
    assert len(updates) == len(ctx.texts) and {"label": "训练"} in [
        {k: v for k, v in u.items() if k == "label"} for u in updates]


def test_template_advice_for_a_chat_model(default_model):
    from webui import chatfmt

    assert chatfmt.suggested(default_model) == "auto"
    assert chatfmt.advice(default_model, "auto") is None
    kind, text = chatfmt.advice(default_model, "llama3")
    assert kind == "mismatch" and "auto" in text


def test_vocab_extension_preview_shows_tokens_per_character_before_and_after(default_model):
    from webui.tabs.model import vocab_html

    shown = vocab_html("en", str(default_model), "data/vocab_zh_demo.txt", ["identity"], "data/dataset_info.yaml")
    html = shown["value"]
    assert shown["visible"] and "Tokens per character" in html and "added" in html
    before, after = (float(x) for x in re.search(r"([0-9.]+) → ([0-9.]+) \(", html).groups())
    assert after < before  # the Chinese demo tokens shorten the identity data
    missing = vocab_html("en", str(default_model), "data/no-such-list.txt", ["identity"], "data/dataset_info.yaml")
    assert "cannot be used" in missing["value"] and "no-such-list" in missing["value"]
    assert vocab_html("en", str(default_model), "", ["identity"], "data/dataset_info.yaml")["visible"] is False
