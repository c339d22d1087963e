"""`python -m engine.jobs.evaluate JOB_DIR/config.yaml`: base vs. checkpoints on the same evaluation, in one table.

For each model (the base first, then each checkpoint) the chosen tasks run in turn:
  * loss / perplexity on the dataset's answers, with the training label masks (encode_sft);
  * generation: batched, left-padded greedy or sampled answers to each prompt (the conversation without
    its last assistant turn), scored with BLEU-4 / ROUGE against that turn; ``predictions-<k>.jsonl``;
  * multiple choice: accuracy by the log-likelihood of each choice letter (engine.jobs.choice_eval);
  * harness: lm-evaluation-harness tasks (engine.jobs.harness), each metric a column "<task> <metric>".
The result is ``result.json``: {"rows": one per model, "predictions": files, ...}.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from engine.run import jobs, rundir
from engine.run.checkpoint import load_for_eval, load_tokenizer_for
from engine.run.jobchecks import check_eval, load_eval_examples, targets
from engine.run.jobconfig import EvalConfig


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i: i + size]


def loss_and_ppl(model, tokenizer, template, convs, cfg: EvalConfig, tick) -> dict:
    """Token-weighted mean loss over every answer token (the training masks), and its perplexity."""
    import torch

    from engine.data.encode import IGNORE_INDEX, encode_sft

    encoded = [e for m in convs for e in encode_sft({"messages": m}, template, tokenizer, cutoff_len=cfg.data.cutoff_len)]
    total, tokens = 0.0, 0
    pad = tokenizer.pad_token_id
    for batch in _batches(encoded, cfg.generation.batch_size):
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in batch])
        labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in batch])
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch])
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        shift, target = logits[:, :-1], labels[:, 1:].to(logits.device)
        losses = torch.nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1),
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
        total += losses.item()
        tokens += int((target != IGNORE_INDEX).sum())
        tick(len(batch))
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "loss_tokens": tokens}


def generate(model, tokenizer, template, prompts: list[list[dict]], gen, tick) -> list[str]:
    """Batched answers (left padding), greedy or sampled, stopped at the template's end of turn."""
    import torch

    stop = template.stop_token_ids(tokenizer) or [tokenizer.eos_token_id]
    out = []
    torch.manual_seed(gen.seed)
    for batch in _batches(prompts, gen.batch_size):
        texts = [template.render_generation_prompt(m) for m in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        kw = dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p) if gen.do_sample and gen.temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            seqs = model.generate(**enc, max_new_tokens=gen.max_new_tokens, eos_token_id=stop,
                                  pad_token_id=tokenizer.pad_token_id, **kw)
        out += [tokenizer.decode(s[enc.input_ids.shape[1]:], skip_special_tokens=True).strip() for s in seqs]
        tick(len(batch))
    return out


def _label(ckpt, base: Path) -> str:
    return f"base ({base.name})" if ckpt is None else ckpt.label


def evaluate(cfg: EvalConfig, job_dir: Path, progress) -> dict:
    import torch

    from engine.jobs.choice_eval import read_benchmark, score
    from engine.data.templates import get_template
    from engine.jobs.textmetrics import mean_scores, sample_scores

    problems = check_eval(cfg)
    if problems:
        from engine.run.config import ConfigError

        raise ConfigError(problems)
    base, models = targets(cfg)
    convs = load_eval_examples(cfg) if (cfg.tasks.loss or cfg.tasks.generation) else []
    questions = read_benchmark(cfg.benchmark.file, cfg.benchmark.max_samples) if cfg.tasks.choice else []
    per_model = len(convs) * (cfg.tasks.loss + cfg.tasks.generation) + len(questions) + cfg.tasks.harness
    progress.plan(per_model * len(models))
    dtype = getattr(torch, cfg.model.dtype)
    rows, files = [], {}
    for k, ckpt in enumerate(models):
        label = _label(ckpt, base)
        progress.phase(f"loading {label}")
        tok_dir = ckpt.path if ckpt is not None and (ckpt.path / "tokenizer_config.json").is_file() else base
        tokenizer = load_tokenizer_for(tok_dir, cfg.model.trust_remote_code)
        template = get_template(cfg.model.template, tokenizer)
        model = load_for_eval(ckpt, base, dtype, cfg.model.trust_remote_code)
        row = {"model": label, "path": str(ckpt.path if ckpt else base)}

        def tick(n, task=None, _label=label):
            progress.advance(n, model=_label, task=task)

        if cfg.tasks.loss:
            progress.phase(f"{label}: loss")
            tokenizer.padding_side = "right"
            row.update(loss_and_ppl(model, tokenizer, template, convs, cfg, lambda n: tick(n, "loss")))
            tokenizer.padding_side = "left"
        if cfg.tasks.generation:
            progress.phase(f"{label}: generation")
            prompts = [m[:-1] for m in convs]
            preds = generate(model, tokenizer, template, prompts, cfg.generation, lambda n: tick(n, "generation"))
            samples = []
            for i, (m, pred) in enumerate(zip(convs, preds)):
                prompt = m[-2]["content"] if len(m) > 1 else ""
                samples.append({"index": i, "prompt": prompt, "reference": m[-1]["content"], "prediction": pred,
                                **sample_scores(pred, m[-1]["content"])})
            name = f"predictions-{k}.jsonl" if len(models) > 1 else "predictions.jsonl"
            if cfg.output.dir:  # elsewhere than the job directory: the result names the file in full
                Path(cfg.output.dir).expanduser().mkdir(parents=True, exist_ok=True)
                name = str(Path(cfg.output.dir).expanduser().resolve() / name)
            with open(job_dir / name, "w", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps(s, ensure_ascii=False) + "\n")
            files[label] = name
            row.update(mean_scores(samples))
        if cfg.tasks.choice:
            progress.phase(f"{label}: multiple choice")
            mc = score(model, tokenizer, template, questions, lambda: tick(1, "choice"))
            row.update(accuracy=mc["accuracy"], by_subject=mc["by_subject"])
        if cfg.tasks.harness:
            from engine.jobs import harness

            progress.phase(f"{label}: lm-evaluation-harness ({', '.join(cfg.harness.tasks)})")
            h = cfg.harness
            found = harness.run(model, tokenizer, h.tasks, h.num_fewshot, h.limit, h.batch_size, h.chat_template)
            row["harness"] = found
            row.update({f"{task} {metric}": value for task, metrics in found.items() for metric, value in metrics.items()
                        if metric != "sample_len"})
            tick(1, "harness")
        rows.append(row)
        rundir.append_jsonl(job_dir / rundir.METRICS, {"result": row})
        del model
    return {"rows": rows, "predictions": files, "samples": len(convs), "questions": len(questions),
            "datasets": cfg.data.datasets, "benchmark": cfg.benchmark.file if cfg.tasks.choice else None,
            "harness": cfg.harness.tasks if cfg.tasks.harness else None}


def main(argv: list[str] | None = None) -> int:
    return jobs.run_job("eval", sys.argv[1:] if argv is None else argv, evaluate)


if __name__ == "__main__":
    sys.exit(main())
