"""`workbench` command line: the same functions the web UI calls."""

from __future__ import annotations

import argparse
import sys

from engine.run.config import DEFAULT_MODEL, ConfigError


def _stop(args) -> int:
    from pathlib import Path

    from engine.run import launch
    from engine.run.queue import DeviceQueue

    from engine.run import rundir

    job_dir = Path(args.run_dir).resolve()
    if not (job_dir / rundir.STATUS).is_file():
        print(f"error: {args.run_dir} is not a run directory (it has no {rundir.STATUS})", file=sys.stderr)
        return 2
    if DeviceQueue(job_dir.parent.parent, devices=[]).cancel(job_dir):  # waiting in the queue: taken off it
        print("cancelled while queued")
        return 0
    if not launch.stop(args.run_dir, force=args.force):
        print(f"{args.run_dir} is not running", file=sys.stderr)
        return 1
    status = launch.wait(args.run_dir, timeout=args.timeout)
    print(status.state if status else "unknown")
    return 0


def _chat(args) -> int:
    from engine.serve.cli import run

    return run(args)


def _api(args) -> int:
    from engine.serve.cli import check_args
    from engine.serve.sampling import InferenceError

    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from engine.serve.api import serve

    try:
        return serve(args.model, args.adapter, host=args.host, port=args.port, api_key=args.api_key,
                     quantization=args.quantization, template=args.template, model_name=args.name,
                     default_max_tokens=args.max_new_tokens, device=args.device)
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _gguf_setup(args) -> int:
    from engine.jobs.gguf import TEST_VOCABS, converter_dir, installed_version, setup_converter, tokenizer_test_vocab

    if installed_version() is None:
        print("error: llama-cpp-python is not installed; install it first with: pip install -e '.[gguf]'", file=sys.stderr)
        return 2
    complete = (converter_dir() / "convert_hf_to_gguf.py").is_file() and all(map(tokenizer_test_vocab, TEST_VOCABS))
    if complete and not args.force:
        print(f"llama.cpp's converter is already in {converter_dir()}")
        return 0
    print(f"unpacking llama.cpp's converter into {setup_converter(args.sdist)}")
    return 0


def _prepare_model(args) -> int:
    from engine.jobs.prepare import prepare_model

    print(f"default model ready at {prepare_model(args.output, force=args.force)}")
    return 0


def _webui(args) -> int:
    from webui.server import serve  # imported here: the engine never imports gradio at module level

    return serve(host=args.host, port=args.port, workspace=args.workspace, auth=args.auth, auth_file=args.auth_file,
                 share=args.share, lang=args.lang, data_roots=args.data_root)


def _plot(args) -> int:
    from pathlib import Path

    from engine.run import rundir
    from engine.run.config import load_config
    from webui.metrics import MetricSeries  # matplotlib only, no gradio
    from webui.plots import plot_words, save_overlay, save_run_plots

    words, runs = plot_words(args.lang), []
    for path in map(Path, args.run_dirs):
        if not (path / rundir.METRICS).is_file():
            print(f"error: {path} is not a run directory with metrics (no {rundir.METRICS})", file=sys.stderr)
            return 2
        series = MetricSeries(path)
        series.update()
        stage = load_config(path / rundir.CONFIG).method.stage if (path / rundir.CONFIG).is_file() else ""
        for written in save_run_plots(series, path, words, stage, tuple(args.format)):
            print(written)
        runs.append((path.name, series))
    if len(runs) > 1:
        for written in save_overlay(runs, Path(args.run_dirs[0]) / "plots", words, tuple(args.format)):
            print(written)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Fine-tune open LLMs: one run config, one engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stop", help="stop a run gracefully (finish the step, save a checkpoint)")
    p.add_argument("run_dir")
    p.add_argument("--force", action="store_true", help="SIGKILL instead of a graceful stop")
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(func=_stop)

    p = sub.add_parser("webui", help="serve the web UI (default http://127.0.0.1:7860); runs outlive the server")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --auth")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workspace", default=None, help="where runs live (default ./workspace or $WORKBENCH_WORKSPACE)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login")
    p.add_argument("--auth-file", default=None, metavar="FILE", help="require a login from this file of user:password lines")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs --auth)")
    p.add_argument("--lang", default="en", choices=["en", "zh"], help="language the page opens in")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="a folder the page may read and write besides the project and the workspace (repeatable; "
                        "also $WORKBENCH_DATA_ROOTS and data_roots in webui/defaults.yaml)")
    p.set_defaults(func=_webui)

    p = sub.add_parser("plot", help="write a run's curves as PNG/SVG files into RUN_DIR/plots (several runs: also compare.*)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--format", nargs="+", default=["png", "svg"], choices=["png", "svg", "pdf"])
    p.add_argument("--lang", default="en", choices=["en", "zh"])
    p.set_defaults(func=_plot)

    p = sub.add_parser("prepare-model", help="convert the embedded default model's GGUF to a local HF model (idempotent)")
    p.add_argument("--output", default=DEFAULT_MODEL)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_prepare_model)

    p = sub.add_parser("gguf-setup", help="unpack llama.cpp's GGUF converter from llama-cpp-python's source distribution "
                                          "(after `pip install -e '.[gguf]'`; idempotent)")
    p.add_argument("--sdist", default=None, help="a llama_cpp_python-<version>.tar.gz already downloaded (default: pip download)")
    p.add_argument("--force", action="store_true", help="unpack again even if the converter is there")
    p.set_defaults(func=_gguf_setup)

    from engine.serve.cli import add_arguments, add_sampling  # torch-free

    p = sub.add_parser("chat", help="chat with a model, run or checkpoint in the terminal (streams; /clear, /exit)")
    add_arguments(p)
    add_sampling(p)
    p.set_defaults(func=_chat)

    p = sub.add_parser("api", help="serve a model, run or checkpoint as an OpenAI-compatible API (/v1/chat/completions)")
    add_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--name", default=None, help="model id reported by /v1/models (default: the checkpoint path)")
    p.set_defaults(func=_api)

    from engine.jobs.cli import add_parsers as add_job_parsers  # train, eval, export

    add_job_parsers(sub)

    from engine.data.cli import add_parsers as add_data_parsers  # data inspect, data add

    add_data_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        for field, message in err.problems:
            where = f"{err.source}: " if err.source else ""
            print(f"error: {where}{field + ': ' if field else ''}{message}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
