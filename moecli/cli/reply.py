"""How a streamed reply is shown: the answer as Markdown (or plain text), the reasoning dimmed.

Replies arrive as (REASONING or ANSWER, text) segments (`moecli.text.reasoning`). `moe chat`
shows them with `stream_reply`: on a terminal a live view of the reasoning, dimmed, above the
answer as Markdown in which every newline stays a line break; elsewhere (or with Markdown off)
plain text as it comes. `moe generate` uses `write_generated`: the answer on stdout, the
reasoning on stderr (dimmed on a terminal), so a pipe receives the answer alone. Hidden
reasoning is not printed; in chat a dim "thinking ..." stands in for it until the answer starts.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from moecli.text.reasoning import ANSWER, Segment

CONTROL = dict.fromkeys(c for c in range(32) if chr(c) not in "\n\t")
REASONING_STYLE = "dim"


class ReplyMarkdown(Markdown):
    """Markdown in which every newline is a line break. CommonMark joins the lines of a paragraph
    (a "soft break" renders as a space), which turns a model's verse or list of lines into run-on
    text; here soft breaks become hard ones. Code blocks are untouched (their text is literal)."""

    def __init__(self, markup: str, **kwargs):
        super().__init__(markup, **kwargs)
        hard_breaks(self.parsed)


def hard_breaks(tokens) -> None:
    for token in tokens:
        if token.type == "softbreak":
            token.type = "hardbreak"
        hard_breaks(token.children or ())


def stream_reply(console: Console, segments: Iterable[Segment], markdown: bool = True,
                 reasoning: bool = True) -> str:
    """Print a streamed reply, as live Markdown on a terminal (unless `markdown` is off) and as
    plain text otherwise, its reasoning dimmed (or, with `reasoning` off, not shown); returns the
    answer. Control characters a model may emit are not sent to the terminal."""
    segments = ((kind, text.translate(CONTROL)) for kind, text in segments)
    answer, thought = "", ""
    if not console.is_terminal or not markdown:
        for kind, text in segments:
            if kind == ANSWER:
                if thought and not answer and not thought.endswith("\n"):
                    console.file.write("\n")  # the answer starts on a line of its own
                answer += text
                console.file.write(text)
            elif reasoning:
                thought += text
                console.print(Text(text, style=REASONING_STYLE), end="", soft_wrap=True)
            console.file.flush()
        console.file.write("\n")
        return answer

    def view():
        parts = []
        if thought and reasoning:
            parts.append(Text(thought.strip("\n"), style=REASONING_STYLE))
        elif thought and not answer:
            parts.append(Text("thinking ...", style=REASONING_STYLE))
        return Group(*parts, ReplyMarkdown(answer))

    with Live(view(), console=console, refresh_per_second=15, vertical_overflow="visible") as live:
        for kind, text in segments:
            if kind == ANSWER:
                answer += text
            else:
                thought += text
            live.update(view())
    return answer


def write_generated(segments: Iterable[Segment], reasoning: bool = True) -> tuple[str, str]:
    """`moe generate`'s output: the answer on stdout and, with `reasoning`, the reasoning on
    stderr as they stream; returns (answer, reasoning)."""
    err = Console(stderr=True, highlight=False)
    answer, thought = "", ""
    for kind, text in segments:
        if kind == ANSWER:
            answer += text
            sys.stdout.write(text)
            sys.stdout.flush()
            continue
        if reasoning:
            err.print(Text(text, style=REASONING_STYLE), end="", soft_wrap=True)
            err.file.flush()
        thought += text
    if reasoning and thought and not thought.endswith("\n"):
        err.print()  # end the reasoning's last line on stderr
    return answer, thought
