"""One request's reply, from the scheduler's token ids to text deltas on the event loop.

The scheduler (`moecli.serve.scheduler`) calls a request's `on_event` from its own thread with a
`Token` per generated id and one `Done` at the end; `Reply` hands each event to the asyncio loop
(`call_soon_threadsafe`) and turns the ids into text as `moe generate` does
(`moecli.inference.text.stream_tokens_as_text`): an incremental detokenizer that never splits a
character, `StopStrings` that hold back what may become a stop string and cut before one, and the
checkpoint's reasoning parser (`moecli.text.reasoning`), which splits the text into reasoning and
answer. A stop string ends the reply at once: the row is cancelled (freed at the scheduler's next
step) and the reply finishes with "stop". A reply whose client went away is cancelled the same way.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

from moecli.inference.sampling import SamplingParams
from moecli.inference.text import StopStrings
from moecli.text.reasoning import ReasoningFormat, Segment
from moecli.text.tokenizer import Tokenizer


@dataclasses.dataclass
class Finish:
    """How a reply ended, and its token counts (`usage`)."""

    reason: str               # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str | None = None

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class ReplyText:
    """Token ids in, (REASONING or ANSWER, text) segments out, with stop strings cut."""

    def __init__(self, tokenizer: Tokenizer, fmt: ReasoningFormat, prompt_ids: list[int], stops: tuple[str, ...]):
        self.detok = tokenizer.incremental_decoder(skip_special_tokens=not fmt.keep_special)
        self.stops = StopStrings(stops)
        self.parser = fmt.start(tokenizer, prompt_ids)

    @property
    def stopped(self) -> bool:
        return self.stops.hit

    def push(self, token: int) -> list[Segment]:
        return self.parser.push(self.stops.push(self.detok.add(token)))

    def finish(self) -> list[Segment]:
        """What was held back, once the reply ended (nothing after a stop string)."""
        tail = "" if self.stops.hit else self.stops.push(self.detok.flush())
        tail += "" if self.stops.hit else self.stops.flush()
        return self.parser.push(tail) + self.parser.flush()


class Reply:
    """Submit one request and iterate its segments; `finish` holds how it ended, afterwards.

    `disconnected` is polled every `POLL_S` seconds; when it says the client left, the row is
    cancelled. Leaving the iteration early (a closed stream) cancels it too."""

    POLL_S = 0.1  # is_disconnected() is one non-blocking receive: cheap

    def __init__(self, scheduler, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
                 fmt: ReasoningFormat, stops: tuple[str, ...], stop_ids: tuple[int, ...]):
        from moecli.serve.scheduler import Request

        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.text = ReplyText(tokenizer, fmt, prompt_ids, stops)
        self.prompt_tokens, self.tokens = len(prompt_ids), 0
        self.finish: Finish | None = None
        self.handle = scheduler.submit(Request(prompt=list(prompt_ids), params=params, stop_ids=tuple(stop_ids),
                                               on_event=self._on_event))  # QueueFull / UsageError: the caller's

    def _on_event(self, event) -> None:
        """Called on the scheduler's thread: hand the event to the loop (gone at shutdown: drop it)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass

    def cancel(self) -> None:
        try:
            self.handle.cancel()
        except Exception:  # noqa: BLE001 - the row may already be gone; nothing is left to free
            pass

    async def segments(self, disconnected: Callable | None = None) -> AsyncIterator[Segment]:
        from moecli.serve.scheduler import Done

        check_at = self.loop.time() + self.POLL_S
        try:
            while self.finish is None:
                if disconnected is not None and self.loop.time() >= check_at:  # polled while tokens flow too
                    check_at = self.loop.time() + self.POLL_S
                    if await disconnected():
                        self.cancel()
                        raise ConnectionAbortedError("the client disconnected")
                try:
                    event = await asyncio.wait_for(self.events.get(), self.POLL_S)
                except asyncio.TimeoutError:
                    continue
                if isinstance(event, Done):
                    self._done(event)
                    for segment in self.text.finish():
                        yield segment
                    return
                if self.text.stopped:
                    continue  # tokens sampled before the cancel took effect: not part of the reply
                self.tokens += 1
                for segment in self.text.push(event.id):
                    yield segment
                if self.text.stopped:
                    self.cancel()  # the stop string ends the reply; Done (with the cache counts) follows
        finally:
            if self.finish is None:  # the stream was closed early (client gone) or failed
                self.cancel()

    def _done(self, done) -> None:
        reason = "stop" if self.text.stopped else done.reason
        self.finish = Finish(reason=reason, prompt_tokens=self.prompt_tokens, completion_tokens=self.tokens,
                             cached_tokens=getattr(done, "cached_tokens", 0) or 0,
                             error=getattr(done, "error", None))

    async def collect(self, disconnected: Callable | None = None) -> tuple[str, str]:
        """The whole reply: (answer, reasoning)."""
        from moecli.text.reasoning import ANSWER

        parts: dict[str, list[str]] = {}
        async for kind, text in self.segments(disconnected):
            parts.setdefault(kind, []).append(text)
        answer = "".join(parts.get(ANSWER, ()))
        reasoning = "".join(t for k, v in parts.items() if k != ANSWER for t in v)
        return answer, reasoning
