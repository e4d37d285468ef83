"""`moe serve`: an OpenAI-compatible HTTP server (`moecli.serve.api`) over the batching scheduler.

The command checks its flags, loads the model, starts the scheduler (`moecli.serve.scheduler`),
compiles the first programs with a two-token warm-up request (so the first client does not wait for
the compiler), binds the socket itself (a port in use is one clear error line, not a traceback) and
runs uvicorn on it. Ctrl-C or SIGTERM stops it cleanly: uvicorn finishes the open responses (a few
seconds at most), then the scheduler thread is stopped and the command exits 0.
"""
from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from typing import List, Optional

import typer

from moecli.cli.app import command
from moecli.cli import options as opt
from moecli.errors import UsageError



@command("serve")
def serve(
    model: Optional[str] = opt.Model, revision: Optional[str] = opt.Revision,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens the server "
                             "to the network (use --api-key then)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Requests decoded together in one batch."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait for a batch row; "
                                  "beyond that the server answers 429."),
    context: Optional[int] = opt.Context,
    prefill_chunk: int = typer.Option(256, "--prefill-chunk", help="Prompt tokens prefilled per step, so a "
                                      "long prompt does not stall the running replies."),
    prefix_cache_mb: float = typer.Option(512, "--prefix-cache-mb", help="Memory for cached prompt prefixes "
                                          "reused by later requests (0: off)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on "
                                          "every request (not /health)."),
    dtype: str = opt.Dtype, quantize: Optional[str] = opt.Quantize, devices: Optional[int] = opt.Devices,
    template_var: Optional[List[str]] = opt.TemplateVar, reasoning_effort: Optional[str] = opt.ReasoningEffort,
) -> None:
    """Serve the model over OpenAI's HTTP API (chat completions, completions), batching concurrent requests."""
    for name, value, least in (("--port", port, 0), ("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                               ("--prefill-chunk", prefill_chunk, 1), ("--prefix-cache-mb", prefix_cache_mb, 0)):
        if value < least or (name == "--port" and value > 65535):
            raise UsageError(f"{name} must be {'in 0..65535' if name == '--port' else f'at least {least}'}, "
                             f"got {value}", f"see `moe serve --help`")
    if context is not None and context <= 0:
        raise UsageError(f"the context window must be positive, got --context {context}", "e.g. --context 4096")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty", "pass the key clients will send, or leave --api-key out")
    variables = opt.reasoning_vars(opt.template_vars(template_var), reasoning_effort)
    sock = listen(host, port)  # before loading: a port in use fails at once

    from moecli.inference.text import context_window, load, note
    from moecli.serve.api import create_app
    from moecli.serve.scheduler import Scheduler

    source = opt.model_source(model)
    print(f"loading {source} ...", file=sys.stderr)
    m, tokenizer = load(source, dtype=dtype, revision=revision, devices=devices, quantize=quantize)
    window = context_window(m, context, note)
    scheduler = Scheduler(m, max_batch=max_batch, context=window, max_queue=max_queue,
                          prefill_chunk=prefill_chunk, prefix_cache_mb=prefix_cache_mb)
    try:
        print("compiling the batched decode steps ...", file=sys.stderr)
        scheduler.precompile().start()  # every batch bucket's programs, so no client waits on the compiler
        model_id = model or "bardmoe"
        app = create_app(m, tokenizer, scheduler, model_id, api_key=api_key, template_vars=variables)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"moe serve · {model_id} · http://{shown}:{bound_port}/v1 · batch {max_batch}, queue {max_queue}, "
              f"context {window} tokens{' · API key required' if api_key else ''} · Ctrl-C to stop", flush=True)
        run_uvicorn(app, sock)
    finally:
        scheduler.close()
        sock.close()
    print("moe serve: stopped", file=sys.stderr)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, listening; a clear error when that cannot be done."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UsageError(f"cannot listen on {host!r}: {err.strerror}", "pass --host 127.0.0.1 or an address of "
                         "this machine") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror}",
                         "pick another --port (or stop what is using this one)") from None
    sock.set_inheritable(True)
    return sock


def run_uvicorn(app, sock: socket.socket) -> None:
    """uvicorn on `sock` until Ctrl-C or SIGTERM, which it handles as a graceful shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal once it has shut down, which under SIGTERM would kill
            # the process before the scheduler is closed; this one only records it.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            lifespan="off")
    Server(config).run(sockets=[sock])
