"""The GPU path in one command: speed, memory and MFU of the engine's training methods and of chat, on one GPU.

    python bench/gpu_check.py                      # on the GPU machine: a random 1.7B Llama, alpaca_en_demo
    python bench/gpu_check.py --device cpu --tiny  # the same pipeline on a tiny model and a few steps (CI, < 2 min)
    python bench/gpu_check.py --preflight          # which packages the check needs are missing here

It builds a random-initialised Llama of SmolLM2-1.7B's shape (or a tiny one) over the default model's tokenizer,
then trains it through `workbench train` under the DeepSpeed launcher (NCCL on GPUs, gloo on CPU): LoRA r16
all-linear, QLoRA NF4 + double quant, full fine-tuning with ZeRO-2; then the same LoRA and QLoRA workloads with
plain TRL SFTTrainer + PEFT (padded batches, SDPA); then chat through the web UI's worker process (time to first
token, decode tokens/s for a 64-token answer). Every run is its own process, and nvidia-smi after each one shows
what is left on the GPU. Prints one table; see bench/GPU_CHECK.md for carrying the packages to a GPU machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_FLOPS = 989e12  # H200 (SXM) dense bf16
SHAPES = {
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=8192, rope_theta=130000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
}
WORKBENCH = {  # row -> run-config sections
    "workbench lora": {"method": {"finetuning_type": "lora"}},
    "workbench qlora": {"method": {"finetuning_type": "qlora"}, "model": {"quantization": "nf4", "double_quant": True}},
    "workbench full zero2": {"method": {"finetuning_type": "full"}, "distributed": {"zero_stage": 2},
                             "training": {"learning_rate": 1e-5}},
}
BASELINES = {"trl lora": "lora", "trl qlora": "qlora"}
ASK = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
NEEDED = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "deepspeed", "bitsandbytes", "pydantic",
          "yaml", "psutil")
ENGINE = ("engine.train.entry", "engine.train.attention", "engine.train.stages", "engine.train.model_setup",
          "engine.serve.inference")


def first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, cutoff 128, batch 2, 1 + 2 steps")
    p.add_argument("--data", type=Path, default=first_existing(
        ROOT / "shared" / "datasets" / "alpaca_en_demo.json", ROOT.parent / "shared" / "datasets" / "alpaca_en_demo.json",
        Path("/work/shared/datasets/alpaca_en_demo.json")), help="alpaca_en_demo.json")
    p.add_argument("--tokenizer", type=Path, default=first_existing(ROOT / "bench" / "tokenizer",
                                                                    ROOT / "models" / "SmolLM2-135M-Instruct"),
                   help="a directory with the default model's tokenizer files")
    p.add_argument("--out", type=Path, default=ROOT / "workspace" / "gpu_check",
                   help="work directory (the model, runs, logs); the table and logs are also copied to $OUT when set")
    p.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    p.add_argument("--preflight", action="store_true", help="report the packages the check needs, then exit")
    p.add_argument("--baseline", choices=sorted(set(BASELINES.values())), help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    big = not a.tiny
    a.cutoff, a.batch, a.warmup, a.steps = (1024, 8, 5, 30) if big else (128, 2, 1, 2)
    a.max_samples = None if big else 32
    a.model = a.out / ("model-1.7b" if big else "model-tiny")
    return a


def preflight() -> int:
    missing = []
    for name in NEEDED:
        try:
            mod = importlib.import_module(name)
            print(f"ok       {name} {getattr(mod, '__version__', '')}")
        except Exception as err:  # noqa: BLE001 - any import failure counts as missing
            missing.append(name)
            print(f"MISSING  {name}: {type(err).__name__}: {err}")
    if "torch" not in missing:
        import torch

        print(f"python {sys.version.split()[0]}, cuda {torch.version.cuda}, GPUs {torch.cuda.device_count()}")
    for name in ENGINE:  # the engine against this machine's transformers / peft / trl
        try:
            importlib.import_module(name)
            print(f"ok       {name}")
        except Exception as err:  # noqa: BLE001
            missing.append(name)
            print(f"FAILS    {name}: {type(err).__name__}: {err}")
    if not missing:
        from engine.train.attention import register

        print(f"packed-batch attention here: {register()}")
    return 1 if missing else 0


# ------------------------------------------------------------------ model (child process)


def build_model(a) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **SHAPES["tiny" if a.tiny else "1.7b"])
    torch.manual_seed(42)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    with torch.device(a.device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(a.model)
    tok.save_pretrained(a.model)
    (a.model / "gpu_check.json").write_text(json.dumps({"params": model.num_parameters()}))


# ------------------------------------------------------------------ the TRL baseline (child process)


def _alpaca(a) -> list[dict]:
    rows = json.loads(a.data.read_text(encoding="utf-8"))[: a.max_samples]
    return [{"prompt": [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")}],
             "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows]


def baseline(a) -> dict:
    import resource

    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if a.baseline == "qlora":
        kwargs.update(device_map={"": 0 if cuda else "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    model = AutoModelForCausalLM.from_pretrained(a.model, **kwargs)
    if a.baseline == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    clock = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.append((state.global_step, time.time(), state.num_input_tokens_seen))

    args = SFTConfig(output_dir=str(a.out / f"trl-{a.baseline}"), max_steps=a.warmup + a.steps, per_device_train_batch_size=a.batch,
                     gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1,
                     save_strategy="no", report_to=[], bf16=cuda, gradient_checkpointing=False, max_length=a.cutoff,
                     packing=False, padding_free=False, seed=42, data_seed=42, use_cpu=not cuda, disable_tqdm=True,
                     include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)
    tok = AutoTokenizer.from_pretrained(a.model)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_alpaca(a)), processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
                         callbacks=[Clock()])
    trainer.train()
    (_, t0, n0), (_, t1, n1) = clock[a.warmup - 1], clock[-1]
    out = {"tokens_per_s": (n1 - n0) / (t1 - t0), "steps": len(clock)}
    if cuda:
        out.update(alloc_mb=torch.cuda.max_memory_allocated() / 2**20, reserved_mb=torch.cuda.max_memory_reserved() / 2**20)
    else:
        out["alloc_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ------------------------------------------------------------------ the parent: runs, chat, table


def gpu_used() -> str:
    if not shutil.which("nvidia-smi"):
        return "n/a"
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.strip().replace("\n", ", ") or out.stderr.strip()[:60]


def child(a, *extra: str, log: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(Path(__file__).resolve()), "--device", a.device, "--out", str(a.out),
            "--tokenizer", str(a.tokenizer), "--data", str(a.data)] + (["--tiny"] if a.tiny else []) + list(extra)
    with open(log, "w") as f:
        return subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def run_config(a, row: str) -> dict:
    cfg = {
        "model": {"path": str(a.model)},
        "method": {"stage": "sft", "lora_rank": 16, "lora_alpha": 32, "lora_target": "all-linear"},
        "data": {"datasets": [str(a.data)], "cutoff_len": a.cutoff, "max_samples": a.max_samples},
        "training": {"max_steps": a.warmup + a.steps, "per_device_train_batch_size": a.batch, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-4, "lr_scheduler_type": "constant", "save_steps": 100_000, "logging_steps": 1,
                     "seed": 42, "precision": "bf16" if a.device == "cuda" else "auto"},
        "output": {"run_dir": str(a.out / row.replace(" ", "-"))},
    }
    for section, values in WORKBENCH[row].items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def workbench_run(a, row: str) -> dict:
    import yaml

    from engine.run import rundir

    run_dir = a.out / row.replace(" ", "-")
    shutil.rmtree(run_dir, ignore_errors=True)
    path = a.out / f"{row.replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump(run_config(a, row)))
    with open(a.out / f"{row.replace(' ', '-')}.out", "w") as f:
        proc = subprocess.run([sys.executable, "-m", "engine.cli", "train", str(path), "--foreground"], stdout=f,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    rows = [r for r in rundir.read_metrics(run_dir) if "loss" in r and "tokens" in r]
    if proc.returncode or len(rows) < a.warmup + a.steps:
        status = rundir.read_status(run_dir)
        raise RuntimeError(f"{status.error if status else 'no status'} (see {run_dir}/train.log)")
    r0, r1 = rows[a.warmup - 1], rows[-1]
    last = rows[-1]
    out = {"tokens_per_s": (r1["tokens"] - r0["tokens"]) / (r1["time"] - r0["time"]), "steps": len(rows)}
    if "gpu_allocated_mb" in last:
        out.update(alloc_mb=max(last["gpu_allocated_mb"]), reserved_mb=max(last["gpu_reserved_mb"]))
    else:
        out["alloc_mb"] = max(r["memory_mb"] for r in rows)
    log = (run_dir / rundir.LOG).read_text(errors="replace")
    out["attention"] = next((line.rsplit(": ", 1)[1] for line in log.splitlines() if "attention for packed" in line), "?")
    return out


def chat_run(a) -> dict:
    from engine.serve.sampling import SamplingParams
    from engine.serve.worker import InferenceWorker

    worker = InferenceWorker()
    try:
        worker.load(str(a.model), device="cuda:0" if a.device == "cuda" else "cpu")
        params = SamplingParams(temperature=0, max_new_tokens=64)
        list(worker.chat(ASK, params))  # warm-up: kernels, caches
        start = time.perf_counter()
        first = None
        for _ in worker.chat(ASK, params):
            first = first or time.perf_counter()
        end = time.perf_counter()
        n = worker.last.completion_tokens
        out = {"ttft_ms": 1000 * ((first or end) - start), "decode_tps": (n - 1) / (end - first) if first and n > 1 else 0.0,
               "tokens": n}
    finally:
        worker.unload()
    freed = worker.freed or {}
    out["after_unload"] = f"{freed['gpu_allocated'] / 2**20:.0f} MB allocated" if "gpu_allocated" in freed else "n/a"
    return out


def table(a, params: int, results: dict) -> str:
    cuda = a.device == "cuda"
    mem = "peak GPU alloc / reserved" if cuda else "peak RSS"
    lines = [f"| run | input tokens/s | {mem} | MFU | steps | GPU memory used after |", "|---|---|---|---|---|---|"]
    for row, r in results.items():
        if row == "chat worker":
            continue
        if "error" in r:
            lines.append(f"| {row} | failed: {r['error']} | | | | {r.get('after', '')} |")
            continue
        memory = f"{r['alloc_mb'] / 1024:.2f} GB" + (f" / {r['reserved_mb'] / 1024:.2f} GB" if "reserved_mb" in r else "")
        mfu = f"{100 * 6 * params * r['tokens_per_s'] / PEAK_FLOPS:.1f}%" if cuda else "n/a (cpu)"
        lines.append(f"| {row} | {r['tokens_per_s']:,.0f} | {memory} | {mfu} | {r['steps']} | {r['after']} |")
    chat = results.get("chat worker")
    if chat:
        text = (f"failed: {chat['error']}" if "error" in chat else f"TTFT {chat['ttft_ms']:.0f} ms, decode "
                f"{chat['decode_tps']:.1f} tok/s ({chat['tokens']} tokens; after unload {chat['after_unload']})")
        lines.append(f"| chat worker | {text} | | | | {chat.get('after', '')} |")
    shape = "tiny" if a.tiny else "1.7b"
    lines += ["", f"model: random Llama ({shape}), N = {params:,} parameters in the forward (trainable + frozen); "
              f"data {a.data.name}, cutoff {a.cutoff}, batch {a.batch}, {a.steps} steps timed after {a.warmup} warm-up steps, "
              f"seed 42, {'bf16' if cuda else 'fp32'} on {a.device}",
              f"MFU = 6 * N * tokens/s / {PEAK_FLOPS:.0f} (H200 dense bf16 peak). For LoRA and QLoRA 6N is the usual "
              "approximation: frozen weights need no weight gradients, so their true FLOPs are nearer 4N.",
              "attention for packed batches: " + ", ".join(f"{k}: {v['attention']}" for k, v in results.items()
                                                          if "attention" in v)]
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.preflight:
        return preflight()
    if a.build:
        build_model(a)
        return 0
    if a.baseline:
        out = baseline(a)
        (a.out / f"trl-{a.baseline}.json").write_text(json.dumps(out))
        return 0
    for what, path in (("--data", a.data), ("--tokenizer", a.tokenizer)):
        if path is None or not path.exists():
            print(f"error: {what}: not found ({path}); see bench/GPU_CHECK.md", file=sys.stderr)
            return 2
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    order = [*WORKBENCH, *BASELINES, "chat worker"]
    if only - set(order):
        print(f"error: --only: unknown rows {sorted(only - set(order))} (rows: {', '.join(order)})", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (a.model / "gpu_check.json").is_file():
        proc = child(a, "--build", log=a.out / "build.log")
        if proc.returncode:
            print((a.out / "build.log").read_text()[-3000:], file=sys.stderr)
            return 1
    params = json.loads((a.model / "gpu_check.json").read_text())["params"]
    saved = a.out / "results.json"  # rows of an earlier --only call on this machine stay in the table
    results: dict[str, dict] = json.loads(saved.read_text()) if only and saved.is_file() else {}
    for row in order:
        if only and row not in only:
            continue
        started = time.time()
        try:
            if row in WORKBENCH:
                results[row] = workbench_run(a, row)
            elif row in BASELINES:
                log = a.out / f"{row.replace(' ', '-')}.log"
                if child(a, "--baseline", BASELINES[row], log=log).returncode:
                    raise RuntimeError(log.read_text(errors="replace").strip().splitlines()[-1][:200])
                results[row] = json.loads((a.out / f"trl-{BASELINES[row]}.json").read_text())
            else:
                results[row] = chat_run(a)
        except Exception as err:  # noqa: BLE001 - one failed row does not hide the others
            results[row] = {"error": f"{type(err).__name__}: {err}"[:300]}
        results[row]["after"] = gpu_used()
        print(f"[gpu_check] {row}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    results = {row: results[row] for row in order if row in results}
    text = table(a, params, results)
    print(text)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    (a.out / "table.md").write_text(text + "\n")
    if os.environ.get("OUT"):  # the device machine's return folder: the table, the numbers and every log
        dest = Path(os.environ["OUT"])
        for f in [a.out / "table.md", a.out / "results.json", *a.out.glob("*.log"), *a.out.glob("*.out"),
                  *a.out.glob("*/train.log"), *a.out.glob("*/metrics.jsonl")]:
            target = dest / f.relative_to(a.out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
    print(f"\n[gpu_check] {time.time() - t0:.0f} s in all; results in {a.out}", file=sys.stderr)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
