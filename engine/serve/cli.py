"""`workbench chat`: a multi-turn chat in the terminal, streaming each answer as it is generated.

Commands: /clear forgets the conversation, /exit (or Ctrl-D) leaves. Ctrl-C during an answer stops
that answer and keeps the chat going. ``--single-turn`` answers one message (``--message`` or stdin)
and exits.
"""

from __future__ import annotations

import sys

from engine.serve.sampling import InferenceError, SamplingParams


def params_from(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)


def check_args(args) -> str | None:
    """One sentence naming the first option of `workbench chat` or `workbench api` that cannot work, found before
    any weights load (sampling bounds, port, host, the model's config.json and tokenizer files); None when all can."""
    from pydantic import ValidationError

    from engine.run.checks import model_dir_problem
    from engine.serve.sampling import resolve_target

    given = {f: getattr(args, f) for f in SamplingParams.model_fields if getattr(args, f, None) is not None}
    try:
        SamplingParams(**given)
    except ValidationError as err:
        first = err.errors()[0]
        return f"--{str(first['loc'][0]).replace('_', '-')} {first['input']}: {first['msg'].lower()}"
    if getattr(args, "host", None) is not None:
        problem = check_address(args.host, args.port)
        if problem:
            return problem
    try:
        target = resolve_target(args.model, args.adapter)
    except InferenceError as err:
        return f"--model {args.model}: {err}"
    problem = model_dir_problem(target.base, target.tokenizer_dir)
    return f"--model {args.model}: {problem}" if problem else None


def check_address(host: str, port: int) -> str | None:
    """One sentence for a --port outside 1-65535 or a --host this machine cannot resolve (api and webui)."""
    import socket

    if not 1 <= port <= 65535:
        return f"--port {port}: a port number is between 1 and 65535"
    try:
        socket.getaddrinfo(host, port)
    except (socket.gaierror, UnicodeError) as err:
        return f"--host {host}: this machine cannot resolve it to an address ({getattr(err, 'strerror', None) or err})"
    return None


def answer(chat, history: list[dict], params: SamplingParams, out=sys.stdout) -> str | None:
    """Stream one answer to ``out``; the answer text, or None when the request was refused."""
    try:
        stream = chat.stream(history, params)
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    try:
        for piece in stream:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        stream.close()
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return stream.result.text if stream.result else ""


def run(args) -> int:
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from engine.serve.inference import ChatModel

    try:
        chat = ChatModel.load(args.model, adapters=args.adapter, quantization=args.quantization, template=args.template,
                              device=args.device)
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for w in chat.warnings:
        print(f"warning: {w}", file=sys.stderr)
    params = params_from(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.single_turn:
        message = args.message if args.message is not None else sys.stdin.read().strip()
        text = answer(chat, system + [{"role": "user", "content": message}], params)
        return 0 if text is not None else 1
    label = ", ".join(chat.target.adapters) or chat.target.base
    print(f"chatting with {label} (template {chat.template.name}); /clear forgets, /exit leaves", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/clear":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        text = answer(chat, system + history, params)
        if text is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": text})


def add_arguments(p) -> None:
    """The options `workbench chat` and `workbench api` share: what to load and how to sample."""
    defaults = SamplingParams()
    p.add_argument("--model", required=True, help="a model directory, merged export, run directory or checkpoint")
    p.add_argument("--adapter", action="append", default=[], help="a LoRA checkpoint to put on the model (repeatable)")
    p.add_argument("--quantization", default="none", choices=["none", "nf4", "fp4", "int8"], help="load the base in 4 or 8 bits")
    p.add_argument("--template", default=None, help="override the chat template saved with the checkpoint (warns)")
    p.add_argument("--device", default="auto", help="where the model runs: auto (the first GPU, else the CPU), cpu, cuda:N")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)


def add_sampling(p) -> None:
    d = SamplingParams()
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--single-turn", action="store_true", help="answer one message (--message or stdin) and exit")
    p.add_argument("--message", default=None, help="with --single-turn: the message (else read from stdin)")
