"""`python -m engine.jobs.export JOB_DIR/config.yaml`: merge a checkpoint into its base, save, verify, convert, push.

1. checks: checkpoint, base match (adapter shapes vs base modules), output dir, disk space — before any weights load;
2. the adapter model (fp32) gives reference logits on a fixed prompt; LoRA/QLoRA adapters are merged into an
   unquantized base (QLoRA never merges into 4-bit weights); full checkpoints are re-saved;
3. sharded safetensors + tokenizer + chat template + generation config + README model card;
4. verification: the export is reloaded, its logits are compared with the adapter model's. It fails when the
   difference exceeds the tolerance or the export is closer to the base than to the adapter (an unmerged
   export cannot pass), and the failed weights are deleted;
5. optional GGUF files (engine.jobs.gguf): llama.cpp's converter writes the 16/32-bit file from the export, its
   quantizer the K-quants and the rest; each file is loaded in llama.cpp and checked (token ids of a chat-rendered
   sample, the chat template in its metadata, logits within the type's expected loss; a wrong file fails and is
   deleted), the loss reported, and an Ollama Modelfile written beside it (engine.jobs.ollama);
6. optional push to a model hub: one attempt, a clear message when offline.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from engine.data.encode import keep_legacy
from engine.run import jobs, rundir
from engine.run.checkpoint import load_for_eval, resolve
from engine.run.jobchecks import ExportError, check_export, output_dir
from engine.run.jobconfig import ExportConfig

# Allowed max logit difference, relative to the largest reference logit (bf16 keeps ~3 significant digits).
_TOLERANCE = {"float32": 1e-4, "float16": 0.01, "bfloat16": 0.05}


# ---------------------------------------------------------------- the job

def _prompt_ids(tokenizer, prompt: str):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True) \
        if tokenizer.chat_template else prompt
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def greedy(model, tokenizer, ids, max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def _load_source(ckpt, trust_remote_code: bool, tokenizer):
    """The checkpoint's model in fp32 (an adapter on its unquantized base, also for QLoRA adapters)."""
    import torch

    return load_for_eval(ckpt, ckpt.base, torch.float32, trust_remote_code, tokenizer)


def model_card(cfg: ExportConfig, ckpt, n_params: int, verify: dict, gguf: list[dict]) -> str:
    import yaml

    run = ckpt.run_config or {}
    method, data, training = run.get("method", {}), run.get("data", {}), run.get("training", {})
    ft = method.get("finetuning_type", ckpt.kind)
    lines = [
        "---", f"base_model: {ckpt.base or ckpt.path}", "library_name: transformers", "tags: [workbench, "
        f"{ft}]", "---", "", f"# {output_dir(cfg).name}", "",
        f"Exported by Workbench from `{ckpt.path}`.", "",
        f"- **Base model:** `{ckpt.base or ckpt.path}`",
        f"- **Method:** {method.get('stage', '?')} / {ft}" + (f" (merged into a {cfg.output.dtype} base; the adapter was trained on a "
                                                               f"{ckpt.quantization} quantized base)" if ckpt.quantization != "none" else ""),
        f"- **Data:** {', '.join(data.get('datasets', [])) or 'unknown'}",
        f"- **Weights:** {cfg.output.dtype}, {n_params:,} parameters, safetensors shards of at most {cfg.output.max_shard_size}",
        f"- **Verification:** max logit difference vs. the adapter model {verify['max_logit_diff']:.3g} "
        f"(base vs. adapter {verify['base_vs_adapter']:.3g})", "",
    ]
    if method:
        lines += ["## Method", "", "```yaml", yaml.safe_dump({"method": method}, sort_keys=False).strip(), "```", ""]
    if training:
        lines += ["## Hyperparameters", "", "```yaml", yaml.safe_dump({"training": training}, sort_keys=False).strip(), "```", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{output_dir(cfg)}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{output_dir(cfg)}")', "```", ""]
    if gguf:
        lines += ["## GGUF", "", "For llama.cpp-compatible tools (written by llama.cpp's converter and quantizer; tokenizer and "
                  f"chat template included), e.g. `llama-cli -m gguf/{Path(gguf[0]['path']).name}`; each file has an "
                  "Ollama Modelfile beside it:", "",
                  "| file | type | size | max logit difference | top-1 agreement | greedy answer as the merged model |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| `{Path(g['path']).name}` | {g['type']} | {g['bytes'] / 1e6:.1f} MB | {g['max_logit_diff']:.3g} | "
                  f"{g['top1_agreement']:.0%} | {'yes' if g['tokens_match'] else 'no'} |" for g in gguf]
        lines += ["", "```bash", *(g["ollama"]["command"] for g in gguf), "```"]
        notes = dict.fromkeys(g["tokenizer_note"] for g in gguf if g.get("tokenizer_note"))
        lines += [""] + [f"Note: {n}." for n in notes] if notes else []
        lines.append("")
    return "\n".join(lines)


def _copy_sentencepiece(out: Path, *sources) -> None:
    """transformers 5 saves every tokenizer as tokenizer.json alone; a SentencePiece family's (Llama 2, Mistral, Gemma)
    ``tokenizer.model`` is what llama.cpp's converter reads, so it is copied from where the tokenizer was loaded,
    else from the base model. Tokens a run added (model.extend_vocab) are in tokenizer.json's added tokens."""
    if (out / "tokenizer.model").exists():
        return
    for src in sources:
        if src and (Path(src) / "tokenizer.model").is_file():
            shutil.copy2(Path(src) / "tokenizer.model", out / "tokenizer.model")
            return


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def _gguf(out: Path, cfg: ExportConfig, tokenizer, ref_logits, ids, ref_tokens: list[int], log: Path, progress) -> list[dict]:
    """Every GGUF type of ``cfg.output.gguf``: the converter's 16/32-bit file first (the quantizer's source),
    then each type converted or quantized, verified in llama.cpp, and given its Modelfile."""
    from engine.jobs.gguf import FLOAT_TYPES, GGUFError, convert, plan, quantize, verify_gguf
    from engine.jobs.ollama import write_modelfile

    folder = out / "gguf"  # the GGUF files and their Modelfiles, apart from the safetensors export
    name = lambda q: folder / f"{out.name}-{q}.gguf"  # noqa: E731
    source, kept = plan(cfg.output.gguf, cfg.output.dtype)
    results, path = [], None
    try:
        progress.phase(f"converting to GGUF {source}")
        t0 = time.time()
        convert(out, name(source), source, log)
        source_seconds = round(time.time() - t0, 2)
        for qtype in cfg.output.gguf:
            t0 = time.time()
            path = name(qtype)
            if qtype == source:
                write_seconds = source_seconds
            else:
                progress.phase(f"{'converting to' if qtype in FLOAT_TYPES else 'quantizing'} GGUF {qtype}")
                convert(out, path, qtype, log) if qtype in FLOAT_TYPES else quantize(name(source), path, qtype)
                write_seconds = round(time.time() - t0, 2)
            progress.phase(f"verifying GGUF {qtype} in llama.cpp")
            t1 = time.time()
            checked = verify_gguf(path, qtype, tokenizer, ref_logits, ids, ref_tokens)
            checked["ollama"] = write_modelfile(path, out, tokenizer, checked.pop("add_bos"))
            checked.update(write_seconds=write_seconds, verify_seconds=round(time.time() - t1, 2),
                           seconds=round(write_seconds + time.time() - t1, 2))
            results.append(checked)
            progress.advance(phase=f"gguf {qtype}", **{f"gguf_{qtype}_max_logit_diff": checked["max_logit_diff"]})
    except GGUFError as err:
        for p in (path, path and path.with_suffix(".Modelfile")):
            if p is not None:
                p.unlink(missing_ok=True)
        kept_files = [Path(r["path"]).name for r in results]
        raise ExportError(f"GGUF failed: {err}. " + (f"Kept the verified {', '.join(kept_files)}; " if kept_files else
                          "No GGUF file was kept; ") + f"the safetensors export in {out} passed its own verification "
                          "and was kept.") from err
    finally:
        if not kept:
            name(source).unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return results


def export(cfg: ExportConfig, job_dir: Path, progress) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.time()
    progress.plan(5 + len(cfg.output.gguf) + bool(cfg.hub.repo_id))
    progress.phase("checking")
    problems = check_export(cfg)
    if problems:
        raise ExportError("; ".join(f"{f}: {m}" for f, m in problems))
    ckpt = resolve(cfg.model.checkpoint, cfg.model.base or None)
    gguf_log = Path(job_dir) / "gguf-convert.log"
    if cfg.output.gguf:  # the converter's vocabulary pass: tokenizer problems surface before any weights load
        from engine.jobs.gguf import GGUFError, check_vocab

        progress.phase("checking the tokenizer with llama.cpp's converter")
        Path(job_dir).mkdir(parents=True, exist_ok=True)
        tok_src = ckpt.path if (ckpt.path / "tokenizer_config.json").is_file() else ckpt.base
        try:
            check_vocab(ckpt.base or ckpt.path, tok_src, Path(job_dir))
        except GGUFError as err:
            raise ExportError(f"output.gguf: {err}") from err
    final_out = output_dir(cfg)
    out = final_out.with_name(f"{rundir.STAGING}{final_out.name}")  # renamed to final_out once verified
    if out.exists():
        shutil.rmtree(out)  # an export cut short
    out.mkdir(parents=True)
    progress.advance(phase="checked")

    progress.phase("loading the checkpoint")
    tok_dir = ckpt.path if (ckpt.path / "tokenizer_config.json").is_file() else ckpt.base
    tokenizer = keep_legacy(AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=cfg.model.trust_remote_code))
    model = _load_source(ckpt, cfg.model.trust_remote_code, tokenizer)
    ids = _prompt_ids(tokenizer, cfg.verify.prompt)
    ref = _logits(model, ids)
    if ckpt.kind == "adapter":
        with model.disable_adapter():
            base_logits = _logits(model, ids)
        progress.phase("merging the adapter")
        model = model.merge_and_unload()
    else:
        base_logits = ref
    progress.advance(phase="merged")

    progress.phase("saving safetensors")
    n_params = sum(p.numel() for p in model.parameters())
    model = model.to(getattr(torch, cfg.output.dtype))
    model.config.use_cache = True
    model.save_pretrained(out, max_shard_size=cfg.output.max_shard_size.replace(" ", ""), safe_serialization=True)
    del model
    tokenizer.save_pretrained(out)
    _copy_sentencepiece(out, tok_dir, ckpt.base)
    if cfg.output.gguf:  # the added tokens' types, where llama.cpp's converter (and transformers 4) read them
        from engine.jobs.gguf import add_tokens_decoder

        add_tokens_decoder(out)
    src_gen = next((d for d in (ckpt.path, ckpt.base) if d and (d / "generation_config.json").is_file()), None)
    if src_gen:
        GenerationConfig.from_pretrained(src_gen).save_pretrained(out)
    progress.advance(phase="saved")

    progress.phase("verifying the export")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code).eval()
    got = _logits(reloaded, ids)
    diff = (got - ref).abs().max().item()
    to_base = (got - base_logits).abs().max().item()
    delta = (ref - base_logits).abs().max().item()
    tol = cfg.verify.tolerance or _TOLERANCE[cfg.output.dtype] * max(1.0, ref.abs().max().item())
    answer_ids = greedy(reloaded, tokenizer, ids, cfg.verify.max_new_tokens)
    verify = {"max_logit_diff": diff, "export_vs_base": to_base, "base_vs_adapter": delta, "tolerance": tol,
              "prompt": cfg.verify.prompt, "answer": tokenizer.decode(answer_ids, skip_special_tokens=True)}
    if diff > tol or (delta > tol and diff >= to_base):
        shutil.rmtree(out)
        why = ("the export matches the base model rather than the adapter (unmerged?)" if delta > tol and diff >= to_base
               else f"the logits differ by {diff:.3g} > tolerance {tol:g}")
        raise ExportError(f"verification failed: {why}; max difference vs. adapter {diff:.3g}, vs. base {to_base:.3g}. "
                          "The export was deleted.")
    (out / "README.md").write_text(model_card(cfg, ckpt, n_params, verify, []), encoding="utf-8")
    rundir.replace_dir(out, final_out)  # an earlier export (overwrite allowed by check_export) goes only now
    out = final_out
    progress.advance(phase="verified", max_logit_diff=diff)

    result = {"output_dir": str(out), "checkpoint": str(ckpt.path), "base": str(ckpt.base or ckpt.path), "kind": ckpt.kind,
              "quantization": ckpt.quantization, "dtype": cfg.output.dtype, "parameters": n_params,
              "safetensors_bytes": _dir_bytes(out, "*.safetensors"), "shards": len(list(out.glob("*.safetensors"))),
              "verify": verify, "gguf": [], "hub": None}
    del reloaded
    if cfg.output.gguf:
        result["gguf"] = _gguf(out, cfg, tokenizer, got[0].numpy(), ids[0].tolist(), answer_ids, gguf_log, progress)
    if result["gguf"]:
        (out / "README.md").write_text(model_card(cfg, ckpt, n_params, verify, result["gguf"]), encoding="utf-8")
    result["seconds"] = round(time.time() - t0, 2)
    if cfg.hub.repo_id:
        from engine.jobs.hub import push

        progress.phase("pushing to the hub")
        jobs.write_result(job_dir, result)
        result["hub"] = push(cfg.hub, out)
        progress.advance(phase="pushed")
    progress.advance(phase="done")
    return result


def main(argv: list[str] | None = None) -> int:
    return jobs.run_job("export", sys.argv[1:] if argv is None else argv, export)


if __name__ == "__main__":
    sys.exit(main())
