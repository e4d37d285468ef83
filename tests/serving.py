"""Test helpers for `moecli.serve.scheduler`: submit requests and wait for their tokens."""
from __future__ import annotations

import threading

from moecli.inference.sampling import SamplingParams
from moecli.serve.scheduler import Done, Request, Scheduler, Token


class Collected:
    """One request's events: its tokens, then its Done (`wait` blocks until it comes)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.done: Done | None = None
        self.finished = threading.Event()
        self.first = threading.Event()

    def __call__(self, event):
        if isinstance(event, Token):
            self.tokens.append(event.id)
            self.first.set()
        else:
            self.done = event
            self.finished.set()

    def wait(self, timeout: float = 300) -> "Collected":
        assert self.finished.wait(timeout), "the request never finished"
        return self


def submit(scheduler: Scheduler, prompt: list[int], max_tokens: int = 8, stop_ids: tuple[int, ...] = (),
           **sampling) -> tuple[Collected, object]:
    """Submit a request; returns its Collected events and its handle."""
    out = Collected()
    handle = scheduler.submit(Request(list(prompt), SamplingParams(max_tokens=max_tokens, **sampling), out, stop_ids))
    return out, handle
