"""Helpers for the `moe serve` tests: a uvicorn server in a thread on a free loopback port, and a
stub scheduler for the answers the real one gives only under load or failure (429, errors)."""
from __future__ import annotations

import contextlib
import threading
import time

import uvicorn

from moecli.cli.commands.serve import listen


@contextlib.contextmanager
def serving(app):
    """Run `app` on 127.0.0.1 (a free port) in a thread; yields the base URL, "http://127.0.0.1:PORT"."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the test server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class StubHandle:
    def __init__(self):
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class StubScheduler:
    """Follows the scheduler's interface; `mode` says what `submit` does: "full" raises QueueFull,
    "crash" raises an unexpected exception, "error" ends the request with Done(reason="error") after
    one token, "tokens" sends `tokens` then Done("length")."""

    context = 1024

    def __init__(self, mode: str, tokens: tuple[int, ...] = ()):
        self.mode, self.tokens = mode, tokens

    def submit(self, request):
        from moecli.serve.scheduler import Done, QueueFull, Token

        if self.mode == "full":
            raise QueueFull("1 running, 0 queued")
        if self.mode == "crash":
            raise RuntimeError("the stub broke")

        def run():
            for token in self.tokens:
                request.on_event(Token(token))
            reason = "error" if self.mode == "error" else "length"
            request.on_event(Done(reason, len(request.prompt), len(self.tokens), 0,
                                  "device fell over" if reason == "error" else None))

        threading.Thread(target=run, daemon=True).start()
        return StubHandle()

    def stats(self):
        return {"active": 0, "queued": 0, "max_batch": 1}

    def close(self):
        pass
