"""Reasoning in replies: split a model's raw text stream into its reasoning and its answer.

Reasoning models write a chain of thought before the answer, marked up in their own format:

* harmony (gpt-oss; OpenAI, "OpenAI Harmony Response Format", 2025): a reply is a run of messages,
  each `<|start|>ROLE<|channel|>CHANNEL<|message|>TEXT<|end|>`, the last one ending in `<|return|>`
  (done) or `<|call|>` (a tool call). The chat template's generation prompt ends in
  `<|start|>assistant`, so a reply reads `<|channel|>analysis<|message|>…<|end|><|start|>assistant
  <|channel|>final<|message|>…<|return|>`. `analysis` is the chain of thought, `final` the answer;
  `commentary` is a preamble for the user, or, addressed `to=functions.NAME`, a tool call (shown
  as reasoning: it is not for the user). The markers are special tokens, so the stream must be
  decoded with them kept (`ReasoningFormat.keep_special`), and `<|return|>` and `<|call|>` must stop
  generation (`stop_ids`; `<|end|>` must not: it only ends the analysis message).
* think tags (Qwen3, DeepSeek-R1): `<think>…</think>` before the answer; R1's template puts the
  `<think>` in the prompt, so the reply starts inside the reasoning.

A parser turns text pieces, as they stream (a marker or a channel name may arrive split over
several pieces), into `(kind, text)` segments, kind REASONING or ANSWER: text that could still
become a marker is held back until the next piece decides. Parsers are primed with the end of the
prompt (`ReasoningFormat.start`), so they know whether the reply opens inside a header, inside the
reasoning or inside the answer. Earlier turns' reasoning is dropped from the history by the chat
template itself, given the answer as `content` and the reasoning as `thinking` (gpt-oss) or
`reasoning_content` (Qwen3): `chat_template._prepare` exposes a message's `reasoning` under both.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

REASONING, ANSWER = "reasoning", "answer"
Segment = tuple[str, str]  # (REASONING or ANSWER, text)
EFFORTS = ("low", "medium", "high")  # gpt-oss's `reasoning_effort` template variable
PRIME_TOKENS = 32  # how much of the prompt's end primes a parser


def partial_suffix(text: str, strings: Iterable[str]) -> int:
    """Length of the longest end of `text` that is the start (not all) of one of `strings`: text
    that the next piece may complete into one of them, so it cannot be shown yet."""
    return max((k for s in strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class Parser(Protocol):
    def push(self, text: str) -> list[Segment]: ...
    def flush(self) -> list[Segment]: ...


class PlainParser:
    """No reasoning format: every piece is answer, unchanged."""

    def push(self, text: str) -> list[Segment]:
        return [(ANSWER, text)] if text else []

    def flush(self) -> list[Segment]:
        return []


class _MarkerParser:
    """Scans the stream for `MARKERS`: text between them goes to `_text`, each marker to `_marker`.
    Each segment's leading whitespace is dropped (the newline after `</think>`, say), and a new
    message of the kind just shown (a second analysis message) starts on a new line."""

    MARKERS: tuple[str, ...] = ()

    def __init__(self, kind: str = ANSWER):
        self.kind, self.pending, self.fresh = kind, "", True
        self.shown: str | None = None  # the kind of the last text emitted
        self.out: list[Segment] = []

    def push(self, text: str) -> list[Segment]:
        self.pending += text
        while self.pending:
            hits = [(i, m) for m in self.MARKERS if (i := self.pending.find(m)) >= 0]
            if hits:
                i, marker = min(hits)
                self._text(self.pending[:i])
                self.pending = self.pending[i + len(marker):]
                self._marker(marker)
                continue
            keep = partial_suffix(self.pending, self.MARKERS)
            self._text(self.pending[:len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep:]
            break
        return self._take()

    def flush(self) -> list[Segment]:
        self._text(self.pending)
        self.pending = ""
        self._end()
        return self._take()

    def _emit(self, kind: str, text: str) -> None:
        if kind != self.kind:
            self._switch(kind)
        if self.fresh:
            text = text.lstrip()
            if not text:
                return
            self.fresh = False
            text = "\n" + text if self.shown == kind else text
        self.shown = kind
        self.out.append((kind, text))

    def _switch(self, kind: str) -> None:
        self.kind, self.fresh = kind, True

    def _take(self) -> list[Segment]:
        out, self.out = self.out, []
        return out

    def _text(self, text: str) -> None:
        raise NotImplementedError

    def _marker(self, marker: str) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        pass


class ThinkParser(_MarkerParser):
    """`<think>reasoning</think>answer` (Qwen3, DeepSeek-R1)."""

    MARKERS = ("<think>", "</think>")

    def _text(self, text: str) -> None:
        if text:
            self._emit(self.kind, text)

    def _marker(self, marker: str) -> None:
        self._switch(REASONING if marker == "<think>" else ANSWER)


class HarmonyParser(_MarkerParser):
    """gpt-oss's harmony messages: `analysis` (and tool calls) as reasoning, the rest as answer.

    Between `<|start|>` and `<|message|>` is a header (role, channel, recipient), collected whole
    before deciding. A header that runs on past `HEADER_LIMIT` characters, or that has no
    `<|channel|>` when the stream ends, was not a header: a model that ignores the format (a
    briefly trained one) has its text shown as the answer rather than swallowed."""

    MARKERS = ("<|start|>", "<|channel|>", "<|constrain|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")
    HEADER_LIMIT = 200
    _CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")

    def __init__(self, kind: str = ANSWER):
        super().__init__(kind)
        self.header: str | None = None  # None: inside a message's text

    def _text(self, text: str) -> None:
        if self.header is None:
            if text:
                self._emit(self.kind, text)
            return
        self.header += text
        if len(self.header) > self.HEADER_LIMIT:
            self._not_a_header()

    def _marker(self, marker: str) -> None:
        if marker == "<|message|>":
            if self.header is not None:
                self._switch(self.classify(self.header))
                self.header = None
        elif marker in ("<|channel|>", "<|constrain|>"):
            self.header = (self.header or "") + marker  # part of a header (one may open without <|start|>)
        else:  # <|start|> opens a header; <|end|>, <|return|>, <|call|> close a message
            self.header = ""

    def _end(self) -> None:
        if self.header and "<|channel|>" not in self.header:
            self._not_a_header()

    def _not_a_header(self) -> None:
        text, self.header = self.header, None
        self._switch(ANSWER)
        self._emit(ANSWER, text)

    @classmethod
    def classify(cls, header: str) -> str:
        match = cls._CHANNEL.search(header)
        channel = match.group(1) if match else ""
        return REASONING if channel == "analysis" or "to=" in header else ANSWER


@dataclasses.dataclass(frozen=True)
class ReasoningFormat:
    """How a checkpoint marks reasoning: its parser, the extra token ids that end a reply, and
    whether the stream must keep special tokens (harmony's markers are special tokens)."""

    name: str
    make_parser: Callable[[], Parser]
    stop_ids: tuple[int, ...] = ()
    keep_special: bool = False

    def start(self, tokenizer, prompt_ids: list[int]) -> Parser:
        """A parser for a reply to `prompt_ids`, primed with the prompt's end."""
        parser = self.make_parser()
        if isinstance(parser, _MarkerParser) and prompt_ids:
            parser.push(tokenizer.decode(prompt_ids[-PRIME_TOKENS:], skip_special_tokens=not self.keep_special))
            if isinstance(parser, HarmonyParser) and parser.header is not None:
                parser.header = ""  # the prompt's role ("assistant") is no text of the reply
            parser.pending, parser.fresh, parser.shown = "", True, None
        return parser


PLAIN = ReasoningFormat("plain", PlainParser)
HARMONY_STOP_TOKENS = ("<|return|>", "<|call|>")


def reasoning_format(tokenizer) -> ReasoningFormat:
    """The format a checkpoint's replies are in: harmony when the tokenizer has its `<|channel|>`
    and `<|message|>` tokens, think tags when the chat template mentions `</think>`, else plain."""
    if all(tokenizer.token_to_id(t) is not None for t in ("<|channel|>", "<|message|>")):
        stops = tuple(i for t in HARMONY_STOP_TOKENS if (i := tokenizer.token_to_id(t)) is not None)
        return ReasoningFormat("harmony", HarmonyParser, stop_ids=stops, keep_special=True)
    if "</think>" in (getattr(tokenizer, "chat_template", None) or ""):
        return ReasoningFormat("think", ThinkParser)
    return PLAIN


def split_stream(pieces: Iterable[str], parser: Parser) -> Iterator[Segment]:
    """The segments of a stream of text pieces, as soon as each is known."""
    for piece in pieces:
        yield from parser.push(piece)
    yield from parser.flush()


def check_effort(value: str) -> str:
    """A `reasoning_effort` for the chat template (gpt-oss reads it into its system message)."""
    from moecli.errors import UsageError

    if value.lower() not in EFFORTS:
        raise UsageError(f"the reasoning effort is low, medium or high, got {value!r}",
                         "e.g. --reasoning-effort high (/set reasoning_effort high in chat)")
    return value.lower()


def check_shown(value: str) -> bool:
    """--reasoning show|hide (and /set reasoning show|hide) as a bool."""
    from moecli.errors import UsageError

    if value.lower() not in ("show", "hide"):
        raise UsageError(f"reasoning is show or hide, got {value!r}", "e.g. --reasoning hide (/set reasoning hide in chat)")
    return value.lower() == "show"
