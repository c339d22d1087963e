"""Run directories on the tiny model, written directly (no training): LoRA checkpoints built with peft, and a
full fine-tuning checkpoint (the tiny model with its weights nudged); shared by the chat, API, CLI and browser tests."""

from __future__ import annotations

from pathlib import Path


def make_lora_run(tiny_model: Path, root: Path, name: str = "20250101-000000-sft-lora", step: int = 5,
                  seed: int = 1) -> Path:
    """A LoRA run with checkpoint-``step``; call again with another step (and seed) for a second checkpoint of it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.run.config import RunConfig, dump_config

    run_dir = root / "runs" / name
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    cfg = RunConfig()
    cfg.model.path = str(tiny_model)
    cfg.output.run_dir = str(run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    dump_config(cfg, ckpt / "config.yaml")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    # random B matrices (init_lora_weights=False), so the adapter visibly changes the answers
    lora = LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(ckpt)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(f'{{"step": {step}, "loss": 2.5}}\n')
    return run_dir


def make_full_run(tiny_model: Path, root: Path, name: str = "20250101-000000-sft-full", step: int = 4) -> Path:
    """A full fine-tuning run whose checkpoint-``step`` is the tiny model with every weight nudged (so it answers
    differently from its base), saved as the trainer saves full weights: config.json, safetensors, tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.run.config import RunConfig, dump_config

    run_dir = root / "runs" / name
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    cfg = RunConfig()
    cfg.model.path = str(tiny_model)
    cfg.method.finetuning_type = "full"
    cfg.output.run_dir = str(run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(ckpt)
    (run_dir / "metrics.jsonl").write_text(f'{{"step": {step}, "loss": 1.5}}\n', encoding="utf-8")
    return run_dir


def serve_app(app):
    """Serve an ASGI app (the OpenAI-compatible API) on a free loopback port in a thread; a generator of its
    base URL for a module fixture: the server stops when the fixture is torn down."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(10)
