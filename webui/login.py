"""Login throttling for a server that requires a login (``--auth``/``--auth-file``).

After ``LIMIT`` wrong passwords in a row from one client address, Gradio's login route answers that address
with 429 (and ``Retry-After``) for ``LOCK_S`` seconds, the right password included; other addresses are not
affected. A success clears the address's count. Gradio's own ``auth`` callable is not told the client's
address, so this is an ASGI middleware around the app that watches ``POST …/login`` and its answer.

Behind a reverse proxy or a ``--share`` tunnel every visitor arrives from the same address, so a lock there
holds for all of them until it expires.
"""

from __future__ import annotations

import json
import math
import threading
import time

LIMIT = 5
LOCK_S = 60.0


class LoginThrottle:
    def __init__(self, app, limit: int = LIMIT, lock_s: float = LOCK_S, clock=time.monotonic):
        self.app, self.limit, self.lock_s, self.clock = app, limit, lock_s, clock
        self._failures: dict[str, int] = {}
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, address: str) -> float:
        """Seconds the address must still wait before it may try again (0: it may try now)."""
        with self._lock:
            left = self._locked_until.get(address, 0.0) - self.clock()
            if left <= 0:
                self._locked_until.pop(address, None)
            return max(left, 0.0)

    def record(self, address: str, ok: bool) -> None:
        with self._lock:
            if ok:
                self._failures.pop(address, None)
                return
            self._failures[address] = self._failures.get(address, 0) + 1
            if self._failures[address] >= self.limit:
                self._failures.pop(address)
                self._locked_until[address] = self.clock() + self.lock_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("unknown",))[0]
        wait = self.wait(address)
        if wait > 0:
            seconds = math.ceil(wait)
            body = json.dumps({"detail": f"Too many wrong passwords from this address: try again in {seconds} s."})
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", str(seconds).encode())]})
            await send({"type": "http.response.body", "body": body.encode()})
            return
        status = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status.get("code") in (200, 400):  # 400: gradio's "Incorrect credentials"
            self.record(address, status["code"] == 200)
