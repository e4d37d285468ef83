"""The serving loop: requests join a running batch between decode steps and leave it when done.

One background thread owns the model. Each turn of its loop:
  1. admits queued requests while rows are free (a request waits in a bounded queue: `QueueFull`
     beyond it, which the server answers with 429, rather than growing without limit);
  2. prefills one chunk (`prefill_chunk` tokens) of the request being admitted, into a batch-1
     staging cache that starts from the longest cached prefix (`moecli.serve.prefix`) - "chunked
     prefill" (Agrawal et al. 2023, "SARATHI"): a long prompt delays the running sequences' next
     tokens by one chunk at a time, not by its whole length; when the prompt is in, its first token is
     sampled and the staged cache moves into a row (`moecli.serve.batch.Batch.put`);
  3. runs one decode step for every active row, hands each its token (`on_event`) and retires the
     rows that are finished (stop token, max_tokens, full context) or cancelled (a client gone).
Events go to each request's `on_event` callback, called from this thread: a `Token` per generated
token, then exactly one `Done`. A failure inside a step ends the requests it touched with reason
"error" and the loop goes on: no request can stop the server.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp

from moecli.errors import UsageError
from moecli.inference.decoder import Decoder
from moecli.inference.engine import Model
from moecli.inference.sampling import SamplingParams, reply_key, sampler_state
from moecli.serve.batch import Batch
from moecli.serve.prefix import PrefixCache

log = logging.getLogger("moecli.serve")


class QueueFull(Exception):
    """Every row is busy and the queue holds `max_queue` requests already."""


@dataclass(frozen=True)
class Token:
    id: int


@dataclass(frozen=True)
class Done:
    reason: str                # "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0     # prompt tokens taken from the prefix cache instead of prefilled
    error: str | None = None   # with reason "error": one line saying what went wrong


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams     # params.max_tokens: the most tokens to generate
    on_event: Callable[[Token | Done], None]
    stop_ids: tuple[int, ...] = ()


@dataclass
class _Live:
    """A request inside the scheduler: where it is and what its row's cache holds."""
    request: Request
    id: int
    fed: list[int] = field(default_factory=list)  # the tokens its cache holds, in order
    next_token: int = -1       # sampled, not fed yet
    generated: int = 0
    cached: int = 0
    cancelled: bool = False


class Handle:
    def __init__(self, scheduler: "Scheduler", live: _Live):
        self._scheduler, self._live = scheduler, live

    def cancel(self) -> None:
        """Stop this request: its row is freed at the next step (its Done says "cancelled")."""
        self._live.cancelled = True
        self._scheduler._wake()


class Scheduler:
    def __init__(self, model: Model, *, max_batch: int = 8, context: int = 2048, max_queue: int = 64,
                 prefill_chunk: int = 256, prefix_cache_mb: float = 512):
        for name, value in (("max_batch", max_batch), ("context", context), ("prefill_chunk", prefill_chunk)):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}", f"pass a positive --{name.replace('_', '-')}")
        if max_queue < 0:
            raise UsageError(f"max_queue must be >= 0, got {max_queue}", "pass --max-queue 0 or more")
        self.model, self.max_batch, self.context = model, max_batch, context
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.batch = Batch(model, max_batch, context)
        self.stage = Decoder(model, max_len=context, batch=1)
        self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20), all(self.stage.cache.rewindable()))
        self.queue: collections.deque[_Live] = collections.deque()
        self.rows: list[_Live] = []            # row i's request, i < len(rows)
        self.admitting: _Live | None = None    # the request whose prompt is being prefilled
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="moecli-scheduler", daemon=True)
        self.steps = 0

    # --- the caller's side (any thread) ---
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def precompile(self) -> "Scheduler":
        """Compile the decode step of every batch bucket (and the row copies), and the staging prefill of
        a first chunk, before `start`: then no request waits on the compiler (`moe serve` does this)."""
        assert not self._thread.is_alive(), "precompile before start"
        self.batch.precompile()
        self.stage.precompile((min(self.prefill_chunk, self.context),))
        return self

    def submit(self, request: Request) -> Handle:
        if not request.prompt:
            raise UsageError("the prompt is empty", "send at least one token")
        if len(request.prompt) >= self.context:
            raise UsageError(f"the prompt has {len(request.prompt)} tokens; this server's context is "
                             f"{self.context}", "shorten the prompt (or restart the server with a larger --context)")
        request.params.validate()
        with self._cond:
            if self._closed:
                raise UsageError("the server is shutting down", "retry later")
            if len(self.queue) >= self.max_queue + max(0, self._free_rows()):  # free rows take some soon
                raise QueueFull(f"{len(self.rows)} requests running and {len(self.queue)} queued")
            live = _Live(request, next(self._ids))
            self.queue.append(live)
            self._cond.notify()
        return Handle(self, live)

    def stats(self) -> dict:
        with self._cond:
            return {"active": len(self.rows) + (self.admitting is not None), "queued": len(self.queue),
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "context": self.context,
                    "steps": self.steps, "compiled_programs": self.batch.compiles,
                    "prefix_cache": {"entries": len(self.prefixes.entries), "hits": self.prefixes.hits,
                                     "reused_tokens": self.prefixes.reused_tokens}}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; every request still queued or running ends with reason "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _free_rows(self) -> int:
        return self.max_batch - len(self.rows) - (self.admitting is not None)

    # --- the loop (the scheduler's thread) ---
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self.queue or self.rows or self.admitting):
                    self._cond.wait()
                if self._closed:
                    break
                self._drop_cancelled_queued()
                if self.admitting is None and self.queue and self._free_rows() > 0:
                    self.admitting = self.queue.popleft()
                    start = True
                else:
                    start = False
            if self.admitting is not None:
                self._guarded([self.admitting], lambda: self._prefill(start))
            if self.rows:
                self._guarded(list(self.rows), self._decode)
        for live in [*self.rows, *([self.admitting] if self.admitting else []), *self.queue]:
            self._finish(live, "cancelled")
        self.rows, self.admitting = [], None
        self.queue.clear()

    def _guarded(self, touched: list[_Live], step) -> None:
        """Run a step; if it raises, the requests it touched end with an error and the rest go on."""
        try:
            step()
        except Exception as error:  # noqa: BLE001 - a bad step must not stop the server
            log.exception("a step failed")
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            for live in touched:
                self._finish(live, "error", message)
            self.rows = [live for live in self.rows if live not in touched]
            if self.admitting in touched:
                self.admitting = None
            if not self.rows:  # a failed step may have consumed the donated cache: start afresh
                self.batch = Batch(self.model, self.max_batch, self.context)

    def _drop_cancelled_queued(self) -> None:
        for live in [live for live in self.queue if live.cancelled]:
            self.queue.remove(live)
            self._finish(live, "cancelled")

    def _prefill(self, start: bool) -> None:
        live, stage = self.admitting, self.stage
        if live.cancelled:
            self.admitting = None
            return self._finish(live, "cancelled")
        prompt = live.request.prompt
        if start:  # from the longest cached prefix, else from nothing
            n, cached = self.prefixes.match(prompt)
            stage.reset()
            if cached is not None:
                stage.cache = jax.tree_util.tree_map(jnp.copy, cached)
                stage.pos, stage.ids = int(cached.pos), list(prompt[:int(cached.pos)])
                stage.keep_only(n)  # the rewindable layers forget the rest; sets pos and seen
                live.cached = n
        chunk = prompt[stage.pos:stage.pos + self.prefill_chunk]
        logits = stage.feed(chunk)
        if stage.pos < len(prompt):
            return  # more chunks at the next turns of the loop
        params = live.request.params.seeded()
        key, sub = jax.random.split(reply_key(params.seed, 0))  # as Decoder.tokens splits it
        token = int(stage._run("sample", 1, logits, sub, sampler_state(params), stage.seen)[0])
        live.fed = list(prompt)
        row = len(self.rows)
        self.batch.put(row, stage.cache, stage.seen, params, key)
        self.rows.append(live)
        self.admitting = None
        self._emit(live, token)

    def _decode(self) -> None:
        for live in [live for live in self.rows if live.cancelled]:
            self._retire(live, "cancelled")
        if not self.rows:
            return
        tokens = [live.next_token for live in self.rows]
        next_tokens = self.batch.step(tokens)
        self.steps += 1
        for live, token, new in zip(list(self.rows), tokens, next_tokens):
            live.fed.append(token)
            self._emit(live, int(new))

    def _emit(self, live: _Live, token: int) -> None:
        """A sampled token: the end of the request (stop id), or one more token, then maybe its end."""
        request = live.request
        if token in request.stop_ids:
            return self._retire(live, "stop")
        live.generated += 1
        live.next_token = token
        self._send(live, Token(token))
        if live.generated >= request.params.max_tokens or len(live.fed) >= self.context:
            self._retire(live, "length")

    def _retire(self, live: _Live, reason: str) -> None:
        """End a running request: keep its cache for prefix reuse, and fill its row with the last one."""
        row = self.rows.index(live)
        if reason != "error" and self.prefixes.budget > 0:  # (taking a row copies it: not for nothing)
            self.prefixes.store(live.fed, self.batch.take(row))
        last = len(self.rows) - 1
        if row != last:
            self.batch.move(last, row)
            self.rows[row] = self.rows[last]
        self.rows.pop()
        self._finish(live, reason)

    def _finish(self, live: _Live, reason: str, error: str | None = None) -> None:
        self._send(live, Done(reason, len(live.request.prompt), live.generated, live.cached, error))

    @staticmethod
    def _send(live: _Live, event: Token | Done) -> None:
        try:
            live.request.on_event(event)
        except Exception:  # noqa: BLE001 - a consumer's failure must not stop the loop: drop that request
            log.exception("an on_event callback failed")
            live.cancelled = True

