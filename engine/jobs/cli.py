"""`workbench train|eval|export CONFIG [section.field=value ...]`: one command shape for every job kind.

Each prepares the job (``launch.prepare``) and hands it to the workspace's device queue, exactly as the
web UI does: it starts at once when its devices are free; otherwise it is written with status ``queued``
and waits its turn. With ``--foreground`` the command itself waits in line, starts the job when its
devices free up and streams its log. Without it, the command returns at once and a detached waiter
(``python -m engine.run.queue``) starts the job when its turn comes, with or without a UI server
running. ``--no-queue`` starts the job at once whatever holds the devices.
"""

from __future__ import annotations


def run(args) -> int:
    from engine.run import jobs, launch
    from engine.run.config import load_config
    from engine.run.jobconfig import load_job_config
    from engine.run.queue import DeviceQueue, start_waiter

    cfg = load_config(args.config, args.overrides) if args.kind == "train" else \
        load_job_config(args.kind, args.config, args.overrides)
    noun = "run" if args.kind == "train" else "job"
    if args.kind == "train":
        import sys

        from engine.run.checks import warnings

        for field, message in warnings(cfg):
            print(f"warning: {field}: {message}", file=sys.stderr)
        if args.node_rank:  # no_ssh mode: this node runs its own ranks of the run node 0 started
            from engine.run.nodes import join

            return 0 if join(cfg, args.node_rank) == 0 else 1
    workspace = jobs.workspace_dir(args.workspace)
    _, job_dir = launch.prepare(cfg, workspace)
    print(f"{noun} directory: {job_dir}")
    if args.kind == "train" and cfg.training.resume_from:
        from engine.run import rundir

        for path in rundir.incomplete_checkpoints(job_dir):
            print(f"note: {path} is an incomplete save: not resumed from, left for you to delete")
    queue = DeviceQueue(workspace)
    if args.no_queue:
        queue.start_now(job_dir)
    else:
        done = queue.submit(job_dir)
        if done.queued:
            print(f"queued: its devices are held by {', '.join(done.waiting_for)}; it starts when they are free")
            if not args.foreground:
                start_waiter(workspace, job_dir)
                print(f"a waiter process starts it then; cancel with: workbench stop {job_dir}")
                return 0
            try:
                status = queue.wait_turn(job_dir)
            except KeyboardInterrupt:
                queue.cancel(job_dir)
                print("\n[workbench] cancelled while queued")
                return 1
            if status is None or status.state == "stopped":
                print("[workbench] cancelled while queued")
                return 1
    if not args.foreground:
        print(f"started in the background; follow it with: tail -f {job_dir}/train.log")
        return 0
    status = launch.follow(job_dir)
    result = jobs.read_result(job_dir)
    if status.state == "completed" and result and args.kind != "train":
        print(summary(args.kind, result))
    print(f"[workbench] {status.state}" + (f": {status.error}" if status.error else ""))
    return 0 if status.state in (("completed", "stopped") if args.kind == "train" else ("completed",)) else 1



def summary(kind: str, result: dict) -> str:
    if kind == "export":
        v = result["verify"]
        lines = [f"exported {result['output_dir']} ({result['safetensors_bytes'] / 1e6:.1f} MB in {result['shards']} shard(s), "
                 f"{result['seconds']} s); max logit difference vs. the adapter {v['max_logit_diff']:.3g}",
                 f"answer to {v['prompt']!r}: {v['answer']}"]
        lines += [f"GGUF {g['type']}: {g['path']} ({g['bytes'] / 1e6:.1f} MB, {g['seconds']} s); max logit difference "
                  f"{g['max_logit_diff']:.3g}, top-1 agreement {g['top1_agreement']:.0%}, same greedy answer: "
                  f"{'yes' if g['tokens_match'] else 'no'}"
                  + (f"\n  Ollama: {g['ollama']['command']}" if g.get("ollama") else "")
                  + (f"\n  Note: {g['tokenizer_note']}" if g.get("tokenizer_note") else "") for g in result.get("gguf", [])]
        return "\n".join(lines)
    keys = ("loss", "perplexity", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "accuracy")
    harness = dict.fromkeys(f"{t} {m}" for r in result["rows"] for t, ms in (r.get("harness") or {}).items()
                            for m in ms if m != "sample_len")  # lm-evaluation-harness columns, "<task> <metric>"
    shown = [k for k in keys if any(k in r for r in result["rows"])] + list(harness)
    out = ["\t".join(["model"] + shown)]
    for r in result["rows"]:
        out.append("\t".join([r["model"]] + [f"{r[k]:.4g}" if k in r else "-" for k in shown]))
    return "\n".join(out)


HELP = {
    "train": "validate a run config and start it under the DeepSpeed launcher (through the device queue)",
    "eval": "evaluate the base model and checkpoints (loss, BLEU/ROUGE, multiple choice) in one table",
    "export": "merge a checkpoint into its base, verify it, write sharded safetensors (and GGUF), optionally push",
}


def add_parsers(sub) -> None:
    for kind, help_ in HELP.items():
        p = sub.add_parser(kind, help=help_)
        p.add_argument("config", help="run config YAML" if kind == "train" else f"{kind} config YAML (see configs/examples/{kind}.yaml)")
        p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. training.max_steps=30")
        p.add_argument("--workspace", default=None, help="where job directories live and whose device queue it joins (default ./workspace)")
        p.add_argument("--foreground", "-f", action="store_true", help="wait (in the queue, then for the job) and stream its log; "
                       "Ctrl-C stops it gracefully")
        p.add_argument("--no-queue", action="store_true", help="start at once, even while another job holds the devices")
        if kind == "train":
            p.add_argument("--node-rank", type=int, default=0, help="several machines, distributed.launcher=no_ssh: this "
                           "node's rank (0 starts the run, 1.. join it)")
        p.set_defaults(func=run, kind=kind)
