"""`workbench webui` binds loopback by default and refuses to open up without a login."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from webui.server import UnsafeBind, check_bind, is_loopback, parse_auth


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_login(host):
    assert is_loopback(host)
    check_bind(host, share=False, credentials=[])


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com"])
def test_other_addresses_need_a_login(host):
    assert not is_loopback(host)
    with pytest.raises(UnsafeBind, match="--auth"):
        check_bind(host, share=False, credentials=[])
    check_bind(host, share=False, credentials=[("u", "p")])


def test_share_needs_a_login_even_on_loopback():
    with pytest.raises(UnsafeBind, match="--share"):
        check_bind("127.0.0.1", share=True, credentials=[])
    check_bind("127.0.0.1", share=True, credentials=[("u", "p")])


def test_credentials_from_argument_and_file(tmp_path):
    f = tmp_path / "users"
    f.write_text("# team\nann:s3cret\n\nbob:pa:ss\n")
    assert parse_auth("root:pw", str(f)) == [("root", "pw"), ("ann", "s3cret"), ("bob", "pa:ss")]
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(UnsafeBind, match="user:password"):
            parse_auth(bad, None)
    with pytest.raises(UnsafeBind, match="not found"):
        parse_auth(None, str(tmp_path / "missing"))


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--share"], ["--host", "0.0.0.0", "--auth", "broken"]])
def test_cli_refuses_with_one_sentence_and_exit_code_2(args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "webui", "--port", "1", "--workspace", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "runs").exists()  # refused before anything was set up


def test_login_lock_starts_after_five_wrong_passwords_and_ends_after_a_minute():
    import asyncio

    from webui.login import LoginThrottle

    now = [0.0]
    answers = iter([400] * 5 + [200])

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": next(answers), "headers": []})
        await send({"type": "http.response.body", "body": b""})

    throttle = LoginThrottle(app, clock=lambda: now[0])

    def login(address="10.0.0.1"):
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/login", "client": (address, 1)}
        asyncio.run(throttle(scope, None, send))
        return sent[0]["status"]

    assert [login() for _ in range(5)] == [400] * 5
    assert login() == 429 and login("10.0.0.2") == 200  # the lock holds for that address only
    now[0] = 59.0
    assert login() == 429
    now[0] = 60.5
    assert throttle.wait("10.0.0.1") == 0


@pytest.mark.slow
def test_a_real_server_with_auth_locks_an_address_out_after_five_wrong_passwords(tmp_path):
    """`workbench webui --auth`: five wrong passwords from 127.0.0.1, then even the right one gets 429 for a minute,
    while another address (127.0.0.2) still logs in."""
    import http.client
    import json
    from urllib.parse import urlencode

    from webui_server import Server

    server = Server(tmp_path / "ws", tmp_path / "server.log", args=["--auth", "ann:s3cret"])
    server.start()
    try:
        def login(password, source="127.0.0.1"):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30, source_address=(source, 0))
            conn.request("POST", "/login", urlencode({"username": "ann", "password": password}),
                         {"Content-Type": "application/x-www-form-urlencoded"})
            resp = conn.getresponse()
            out = resp.status, resp.getheader("Retry-After"), json.loads(resp.read() or b"{}")
            conn.close()
            return out

        assert login("s3cret")[0] == 200
        assert [login(f"wrong{i}")[0] for i in range(5)] == [400] * 5
        status, retry, body = login("s3cret")
        assert status == 429 and 55 <= int(retry) <= 60
        assert body["detail"].startswith("Too many wrong passwords from this address: try again in ")
        assert login("s3cret", source="127.0.0.2")[0] == 200
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()


def test_the_page_is_served_without_torch(tmp_path):
    """The real server answers the page without loading torch (so neither trl, peft, transformers' models nor
    deepspeed, which all import it): tokenizers and models load only where a page action needs them."""
    import time
    import urllib.request

    from webui_server import Server

    server = Server(tmp_path / "ws", tmp_path / "server.log")
    try:
        server.start()
        page = urllib.request.urlopen(server.url, timeout=30).read().decode("utf-8", "replace")
        assert "Workbench" in page
        time.sleep(2)  # anything started in the background at start-up has had time to import
        maps = (Path("/proc") / str(server.proc.pid) / "maps").read_text()
        libs = sorted({line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/torch/" in line or "libtorch" in line})
        assert libs == [], f"the web UI server loaded torch: {libs[:5]}"
        # matplotlib (PNG/SVG plots, the length histogram) loads with the first figure, not with the page
        assert "/matplotlib/" not in maps, "the web UI server loaded matplotlib at start-up"
        assert "gradio" in maps or "pydantic_core" in maps  # the maps are the server's own (sanity)
    finally:
        server.stop()
