"""GGUF benchmark: the default model's merged export through llama.cpp's converter and quantizer.

A LoRA adapter (rank 8 on all linear layers, random non-zero B, seed 1: a stand-in for a trained run, so the
benchmark needs no training) on SmolLM2-135M-Instruct is exported in bfloat16 with
``output.gguf=[f16, q8_0, q6_k, q5_k_m, q4_k_m]``, as ``workbench export`` does. Prints the README's table (size,
max logit difference to the merged model, top-1 agreement over the prompt, same greedy answer) and the wall time
of each step. Needs the [gguf] extra (``make gguf``).

    .venv/bin/python bench/gguf_export.py [--types f16 q8_0 ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.run.config import DEFAULT_MODEL  # noqa: E402
from engine.run.jobconfig import ExportConfig  # noqa: E402


class _Progress:
    def __init__(self):
        self.t0, self.last = time.time(), None

    def plan(self, total):
        pass

    def phase(self, text):
        now = time.time()
        if self.last:
            print(f"  {self.last}: {now - self.t0:.1f} s", flush=True)
        self.t0, self.last = now, text

    def advance(self, n=1, **row):
        pass


def make_adapter(base: Path, out: Path) -> Path:
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(base), "quantization": "none"},
                                                     "method": {"stage": "sft", "finetuning_type": "lora"}}))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"])
    parser.add_argument("--out", default=None, help="where the export goes (default: a temporary directory)")
    args = parser.parse_args()
    from engine.jobs.export import export

    work = Path(args.out or tempfile.mkdtemp(prefix="gguf-bench-"))
    adapter = make_adapter(Path(DEFAULT_MODEL), work / "run" / "checkpoint-1")
    cfg = ExportConfig.model_validate({"model": {"checkpoint": str(adapter)},
                                       "output": {"dir": str(work / "smollm2-orion"), "job_dir": str(work / "job"),
                                                  "dtype": "bfloat16", "gguf": args.types}})
    progress = _Progress()
    result = export(cfg, work / "job", progress)
    progress.phase("end")
    v = result["verify"]
    print(f"\nexport {result['seconds']} s; safetensors {result['safetensors_bytes'] / 1e6:.1f} MB, max logit difference "
          f"vs. the adapter {v['max_logit_diff']:.3g}; answer: {v['answer']!r}\n")
    print("| file | size | max logit difference vs. merged | expected loss bound | top-1 agreement | same greedy answer "
          "| write | verify |")
    print("|---|---|---|---|---|---|---|---|")
    for g in result["gguf"]:
        print(f"| {g['type']} | {g['bytes'] / 1e6:.1f} MB | {g['max_logit_diff']:.3g} | {g['expected_loss']:.3g} | "
              f"{g['top1_agreement']:.0%} | {'yes' if g['tokens_match'] else g['answer']!r} | {g['write_seconds']} s | "
              f"{g['verify_seconds']} s |")
    (work / "bench.json").write_text(json.dumps(result, indent=2))
    print(f"\n{work / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
