"""`moe chat`: an interactive REPL over `moecli.inference.conversation.ChatSession`.

Input comes from prompt_toolkit (history in moecli's cache folder; Enter sends, Alt+Enter or
Esc then Enter inserts a new line, pasted text keeps its newlines); replies stream as Markdown
through rich. Ctrl-C during a reply stops it and keeps what was written (marked interrupted);
Ctrl-C at the prompt clears the line; Ctrl-D or /exit leaves.
"""
from __future__ import annotations

import signal
import sys
from typing import List, Optional

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table

from moecli.cli.app import command, report
from moecli.cli import options as opt
from moecli.errors import MoecliError

HELP = """\
/help                 this help
/clear                forget the conversation (keeps the system prompt)
/system TEXT          set the system prompt (empty: remove it)
/set NAME VALUE       temperature, top_p, top_k, min_p, max_tokens, seed, repetition_penalty
/stats                statistics of the last reply and the settings
/experts [layer N]    the last reply coloured by expert (layer N), and the expert load per layer
/mask LAYER:EXPERT    switch an expert off (tokens are re-routed to the others); /unmask [L:E] undoes
/save FILE            save messages, settings and model id as JSON
/load FILE            load a chat saved with /save
/exit                 leave (or Ctrl-D)
Enter sends; Alt+Enter (or Esc, Enter) inserts a new line. Ctrl-C stops a reply."""


class Interrupt:
    """While a reply streams, Ctrl-C sets a flag the decoding loop polls between tokens, instead
    of raising inside a device call (which could leave the donated KV cache half-updated)."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def make_input(console: Console):
    """A function that reads one message: prompt_toolkit on a terminal, plain lines otherwise."""
    if not sys.stdin.isatty():
        def read_plain() -> str:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")
        return read_plain

    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    from moecli.runtime import cache_dir

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(cache_dir() / "chat_history"))
    except OSError:
        history = InMemoryHistory()
    session = PromptSession(history=history, key_bindings=keys, multiline=False)
    return lambda: session.prompt(">>> ")


CONTROL = dict.fromkeys(c for c in range(32) if chr(c) not in "\n\t")


def stream_reply(console: Console, pieces) -> str:
    """Print a streamed reply, as live Markdown on a terminal and as plain text otherwise.
    Control characters a model may emit are not sent to the terminal."""
    pieces = (piece.translate(CONTROL) for piece in pieces)
    text = ""
    if not console.is_terminal:
        for piece in pieces:
            text += piece
            console.file.write(piece)
            console.file.flush()
        console.file.write("\n")
        return text
    with Live(Markdown(""), console=console, refresh_per_second=15, vertical_overflow="visible") as live:
        for piece in pieces:
            text += piece
            live.update(Markdown(text))
    return text


def stats_table(chat) -> Table:
    s = chat.last_stats
    table = Table(show_header=False, box=None)
    rows = [("prompt tokens (new / reused)", f"{s.prompt_tokens} / {s.reused_tokens}"),
            ("prefill", f"{s.prefill_tok_s:.1f} tok/s"), ("generated tokens", str(s.generated_tokens)),
            ("decode", f"{s.decode_tok_s:.1f} tok/s"), ("time to first token", f"{s.ttft_s:.3f} s"),
            ("compile", f"{s.compile_s:.3f} s"), ("stopped by", s.stopped_by or "-"),
            ("context used", f"{chat.decoder.pos} / {chat.decoder.max_len}")]
    rows += [(name, str(value)) for name, value in chat.settings().items()]
    for row in rows:
        table.add_row(*row)
    return table


def show_experts(console: Console, chat, arg: str) -> None:
    from moecli.cli.commands.generate import token_pieces
    from moecli.errors import UsageError
    from moecli.inference.routing import moe_layer_numbers, routing_views, token_view

    config = chat.model.config
    layers = moe_layer_numbers(config)
    ids, routing = chat.last_reply_routing()
    if not layers or not ids:
        raise UsageError("no routing to show yet", "ask something first (and use a MoE model)")
    words = arg.split()
    if words and (words[0] != "layer" or len(words) != 2 or not words[1].isdigit()):
        raise UsageError(f"bad /experts argument {arg!r}", "use /experts or /experts layer N")
    layer = int(words[1]) if words else layers[-1]
    console.print(token_view(token_pieces(chat.tokenizer, ids), routing, config, layer))
    for view in routing_views(routing, config, chat.model.mesh, chat.model.dtype.itemsize):
        console.print(view)
    if chat.disabled:
        off = ", ".join(f"{layers[j]}:{e}" for j, es in sorted(chat.disabled.items()) for e in sorted(es))
        console.print(f"[dim]switched off: {off}[/dim]")


def run_command(console: Console, chat, line: str) -> bool:
    """Handle a /command; returns False to leave the REPL."""
    from moecli.errors import UsageError

    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("exit", "quit"):
        return False
    if name == "help":
        console.print(HELP, markup=False)
    elif name == "clear":
        chat.clear()
        console.print("[dim]conversation cleared[/dim]")
    elif name == "system":
        chat.system = arg or None
        console.print(f"[dim]system prompt {'set' if arg else 'removed'}[/dim]")
    elif name == "set":
        setting, _, value = arg.partition(" ")
        if not value.strip():
            raise UsageError("usage: /set NAME VALUE", "e.g. /set temperature 0.5")
        chat.set(setting, value.strip())
        console.print(f"[dim]{setting} = {value.strip()}[/dim]")
    elif name == "stats":
        console.print(stats_table(chat))
    elif name == "experts":
        show_experts(console, chat, arg)
    elif name == "mask":
        chat.mask(arg)
        console.print(f"[dim]expert {arg} is off from the next reply[/dim]")
    elif name == "unmask":
        chat.unmask(arg)
        console.print(f"[dim]{'expert ' + arg if arg else 'all experts'} back on[/dim]")
    elif name in ("save", "load"):
        if not arg:
            raise UsageError(f"usage: /{name} FILE", f"e.g. /{name} chat.json")
        if name == "save":
            console.print(f"[dim]saved to {chat.save(arg)}[/dim]")
        else:
            chat.load(arg)
            console.print(f"[dim]loaded {len(chat.messages)} messages from {arg}[/dim]")
    else:
        raise UsageError(f"unknown command /{name}", "type /help for the list")
    return True


@command("chat")
def chat(
    model: Optional[str] = opt.Model, revision: Optional[str] = opt.Revision,
    max_tokens: int = opt.MaxTokens, temperature: float = opt.Temperature, top_p: float = opt.TopP,
    top_k: int = opt.TopK, min_p: float = opt.MinP, repetition_penalty: float = opt.RepetitionPenalty,
    seed: int = opt.Seed, system: Optional[str] = opt.System, stop: Optional[List[str]] = opt.Stop,
    dtype: str = opt.Dtype, context: int = opt.Context, devices: Optional[int] = opt.Devices,
    template_var: Optional[List[str]] = opt.TemplateVar,
) -> None:
    """Chat with a model in an interactive REPL (/help lists the commands)."""
    from moecli.inference.text import load
    from moecli.inference.conversation import ChatSession
    from moecli.errors import UsageError

    params = opt.sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    variables = opt.template_vars(template_var)
    if max_tokens <= 0:
        raise UsageError(f"--max-tokens must be positive, got {max_tokens}", "pass --max-tokens 1 or more")
    if context <= 0:
        raise UsageError(f"the context window must be positive, got --context {context}", "e.g. --context 4096")
    console = Console(highlight=False)
    source = opt.model_source(model)
    with console.status(f"loading {source} ..."):
        m, tokenizer = load(source, dtype=dtype, revision=revision, devices=devices)
    session = ChatSession(m, tokenizer, params, max_tokens=max_tokens, context=context, system=system,
                          stop=tuple(stop or ()), model_id=source, revision=revision, template_vars=variables,
                          notify=lambda text: console.print(f"[yellow]{escape(text)}[/yellow]"))
    console.print(f"[bold]moe chat[/bold] · {source} · context {session.decoder.max_len} tokens · "
                  "/help for commands, Ctrl-D to leave")
    read = make_input(console)
    while True:
        try:
            line = read()
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt clears the line
        except EOFError:
            break
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not run_command(console, session, line.strip()):
                    break
                continue
            with Interrupt() as interrupt:
                stream_reply(console, session.reply(line, should_stop=lambda: interrupt.requested))
            if session.last_stats.stopped_by == "interrupted":
                console.print("[yellow]\\[interrupted][/yellow]")
        except MoecliError as err:
            report(err)  # one line; the conversation goes on
        except Exception as err:  # noqa: BLE001 - a failed reply must not lose the conversation
            print(f"error: generation failed ({type(err).__name__}: {' '.join(str(err).split())}) — the "
                  "conversation is kept; /save it or try again", file=sys.stderr)
    console.print("[dim]bye[/dim]")
