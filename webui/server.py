"""`workbench webui`: bind safely, then serve the app.

Loopback (127.0.0.1) is the default. Any other address, or a public share link, is refused
unless a login is required (``--auth user:password`` or ``--auth-file``): the page starts
training processes and reads files, so it must never be open to a network without one.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path


class UnsafeBind(ValueError):
    pass


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(auth: str | None, auth_file: str | None) -> list[tuple[str, str]]:
    """Credentials from ``user:password`` and/or a file of such lines (blank lines and # comments skipped)."""
    entries = [auth] if auth else []
    if auth_file:
        path = Path(auth_file).expanduser()
        if not path.is_file():
            raise UnsafeBind(f"auth file not found: {path}")
        entries += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.strip().startswith("#")]
    out = []
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise UnsafeBind("credentials look like user:password (both non-empty)")
        out.append((user, password))
    return out


def check_bind(host: str, share: bool, credentials: list[tuple[str, str]]) -> None:
    if credentials:
        return
    if share:
        raise UnsafeBind("refusing --share without a login: a public link would let anyone start training on this "
                         "machine; add --auth user:password or --auth-file FILE")
    if not is_loopback(host):
        raise UnsafeBind(f"refusing to serve on {host} without a login: anyone who can reach this address could start "
                         "training and read files; add --auth user:password or --auth-file FILE, or bind 127.0.0.1")


def serve(host: str = "127.0.0.1", port: int = 7860, workspace: str | None = None, auth: str | None = None,
          auth_file: str | None = None, share: bool = False, lang: str = "en", data_roots: list[str] = ()) -> int:
    try:
        credentials = parse_auth(auth, auth_file)
        check_bind(host, share, credentials)
    except UnsafeBind as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from engine.serve.cli import check_address

    problem = check_address(host, port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("MPLBACKEND", "Agg")
    # four events of the page at once (gradio's default is one); set through gradio's own variable, not a second
    # demo.queue() call, which rebuilds the whole FastAPI app once more before launch (about a second)
    os.environ.setdefault("GRADIO_DEFAULT_CONCURRENCY_LIMIT", "4")
    # the Hub is online or offline as the user's environment says (HF_HUB_OFFLINE); the header shows which
    from engine.run.launch import workspace_dir

    from .app import create, launch_kwargs

    demo, ctx = create(workspace_dir(workspace), lang=lang, data_roots=data_roots)  # imports no torch: tokenizers load on first use
    print(f"Workbench web UI: http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}  "
          f"(workspace {ctx.workspace}; runs keep going when this server stops)", flush=True)
    extra = {}
    if credentials:  # after 5 wrong passwords from one address, its logins are refused for a minute
        from starlette.middleware import Middleware

        from .login import LoginThrottle

        extra["app_kwargs"] = {"middleware": [Middleware(LoginThrottle)]}
    try:
        demo.launch(
            server_name=host, server_port=port, share=share, auth=credentials or None, show_error=False,
            quiet=True, inbrowser=False, **launch_kwargs(ctx), **extra)
    except OSError as err:
        print(f"error: cannot serve on {host}:{port}: {err}", file=sys.stderr)
        return 2
    finally:
        ctx.manager.stop_background()
    return 0
