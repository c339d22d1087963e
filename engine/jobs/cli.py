"""`workbench eval CONFIG` and `workbench export CONFIG`: the same jobs the web UI starts, with the same overrides."""

from __future__ import annotations



def _checks(kind: str):
    if kind == "eval":
        from engine.jobs.evaluate import check_eval

        return check_eval
    from engine.jobs.export import check_export

    return check_export


def run(args) -> int:
    from engine.run import jobs, launch
    from engine.run.jobconfig import load_job_config

    cfg = load_job_config(args.kind, args.config, args.overrides)
    job_dir = jobs.start_job(args.kind, cfg, args.workspace, checks=_checks(args.kind))
    print(f"job directory: {job_dir}")
    if not args.foreground:
        print(f"started in the background; follow it with: tail -f {job_dir}/train.log")
        return 0
    status = launch.follow(job_dir)
    result = jobs.read_result(job_dir)
    if status.state == "completed" and result:
        print(summary(args.kind, result))
    print(f"[workbench] {status.state}" + (f": {status.error}" if status.error else ""))
    return 0 if status.state == "completed" else 1


def summary(kind: str, result: dict) -> str:
    if kind == "export":
        v = result["verify"]
        lines = [f"exported {result['output_dir']} ({result['safetensors_bytes'] / 1e6:.1f} MB in {result['shards']} shard(s), "
                 f"{result['seconds']} s); max logit difference vs. the adapter {v['max_logit_diff']:.3g}",
                 f"answer to {v['prompt']!r}: {v['answer']}"]
        lines += [f"GGUF {g['type']}: {g['path']} ({g['bytes'] / 1e6:.1f} MB, {g['seconds']} s); max logit difference "
                  f"{g['max_logit_diff']:.3g}, top-1 agreement {g['top1_agreement']:.0%}, same greedy answer: "
                  f"{'yes' if g['tokens_match'] else 'no'}" for g in result.get("gguf", [])]
        return "\n".join(lines)
    keys = ("loss", "perplexity", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "accuracy")
    harness = dict.fromkeys(f"{t} {m}" for r in result["rows"] for t, ms in (r.get("harness") or {}).items()
                            for m in ms if m != "sample_len")  # lm-evaluation-harness columns, "<task> <metric>"
    shown = [k for k in keys if any(k in r for r in result["rows"])] + list(harness)
    out = ["\t".join(["model"] + shown)]
    for r in result["rows"]:
        out.append("\t".join([r["model"]] + [f"{r[k]:.4g}" if k in r else "-" for k in shown]))
    return "\n".join(out)


def add_parsers(sub) -> None:
    for kind, help_ in (("eval", "evaluate the base model and checkpoints (loss, BLEU/ROUGE, multiple choice) in one table"),
                        ("export", "merge a checkpoint into its base, verify it, write sharded safetensors (and GGUF), optionally push")):
        p = sub.add_parser(kind, help=help_)
        p.add_argument("config", help=f"{kind} config YAML (see configs/examples/{kind}.yaml)")
        p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. output.dtype=float16")
        p.add_argument("--workspace", default=None, help="where job directories live (default ./workspace)")
        p.add_argument("--foreground", "-f", action="store_true", help="wait for the job and stream its log")
        p.set_defaults(func=run, kind=kind)

