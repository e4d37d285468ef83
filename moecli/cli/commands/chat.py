"""`moe chat`: an interactive REPL over `moecli.inference.conversation.ChatSession`.

Input comes from prompt_toolkit (history in moecli's cache folder; Enter sends, Alt+Enter or
Esc then Enter inserts a new line, pasted text keeps its newlines); replies stream as Markdown
through rich, in which a newline stays a line break (a model's verse keeps its lines), or as plain
text with --no-markdown or `/set markdown off`; a reasoning model's reasoning is shown dimmed above
its answer, or hidden (`--reasoning hide`, `/set reasoning hide`; `moecli.cli.reply`). Ctrl-C during
a reply stops it and keeps what was written (marked interrupted); Ctrl-C at the prompt clears the
line; Ctrl-D or /exit leaves.
"""
from __future__ import annotations

import dataclasses
import signal
import threading
import sys
import traceback
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moecli.cli.app import DEBUG, command, report
from moecli.cli import options as opt
from moecli.cli.reply import stream_reply
from moecli.errors import MoecliError, first_line

HELP = """\
/help                 this help
/clear                forget the conversation (keeps the system prompt)
/system TEXT          set the system prompt (empty: remove it)
/set NAME VALUE       temperature, top_p, top_k, min_p, max_tokens, seed, repetition_penalty;
                      markdown on|off (off: replies as plain text); reasoning show|hide;
                      reasoning_effort low|medium|high (gpt-oss)
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


@dataclasses.dataclass
class View:
    """How replies are shown: as Markdown (with line breaks kept) or as plain text; reasoning or not."""
    markdown: bool = True
    reasoning: bool = True


def on_off(name: str, value: str) -> bool:
    from moecli.errors import UsageError

    if value.lower() not in ("on", "off"):
        raise UsageError(f"{name} is on or off, got {value!r}", f"e.g. /set {name} off")
    return value.lower() == "on"


def stats_table(chat, view: View) -> Table:
    from moecli.inference.text import speed

    s = chat.last_stats
    table = Table(show_header=False, box=None)
    rows = [("prompt tokens (new / reused)", f"{s.prompt_tokens} / {s.reused_tokens}"),
            ("prefill", speed(s.prefill_tok_s)), ("generated tokens", str(s.generated_tokens)),
            ("decode", speed(s.decode_tok_s)), ("time to first token", f"{s.ttft_s:.3f} s"),
            ("compile", f"{s.compile_s:.3f} s (not in the speeds)"), ("stopped by", s.stopped_by or "-"),
            ("context used", f"{chat.decoder.pos} / {chat.decoder.max_len}")]
    rows += [(name, str(value)) for name, value in chat.settings().items()]
    rows.append(("markdown", "on" if view.markdown else "off"))
    rows.append(("reasoning", f"{'show' if view.reasoning else 'hide'} ({chat.format.name} format)"))
    if "reasoning_effort" in chat.template_vars:
        rows.append(("reasoning_effort", chat.template_vars["reasoning_effort"]))
    for row in rows:
        table.add_row(*row)
    return table


def show_experts(console: Console, chat, arg: str) -> None:
    """/experts: the routing of the last reply generated in this session (a chat brought in by
    /load has none: its replies were written elsewhere, never routed here)."""
    from moecli.errors import UsageError
    from moecli.inference.routing import (moe_layer_numbers, routing_views, token_pieces, token_view,
                                          without_stop_token)

    config = chat.model.config
    layers = moe_layer_numbers(config)
    if not layers:
        raise UsageError("this model has no MoE layers, so no routing to show",
                         "chat with a Mixture-of-Experts checkpoint to see its experts")
    words = arg.split()
    if words and (words[0] != "layer" or len(words) != 2 or not words[1].isdigit()):
        raise UsageError(f"bad /experts argument {arg!r}", "use /experts or /experts layer N")
    ids, routing = chat.last_reply_routing()
    n = without_stop_token(ids, chat.tokenizer)
    ids, routing = ids[:n], routing[:n]
    if not ids:
        raise UsageError("no reply to show the experts of yet",
                         "ask something first: /experts shows the routing of the last reply generated here "
                         "(not of the replies in a chat brought in by /load)")
    layer = int(words[1]) if words else layers[-1]
    colour = console.color_system is not None and not console.no_color
    console.print(token_view(token_pieces(chat.tokenizer, ids), routing, config, layer, colour))
    for view in routing_views(routing, config, "reply", chat.model.mesh, chat.model.dtype.itemsize):
        console.print(view)
    if chat.disabled:
        off = ", ".join(f"{layers[j]}:{e}" for j, es in sorted(chat.disabled.items()) for e in sorted(es))
        console.print(f"[dim]switched off: {off}[/dim]")


def run_command(console: Console, chat, line: str, view: View) -> bool:
    """Handle a /command; returns False to leave the REPL."""
    from moecli.errors import UsageError
    from moecli.inference.conversation import SETTINGS
    from moecli.text.reasoning import check_shown

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
        if setting == "markdown":  # how replies are shown, not a setting of the conversation
            view.markdown = on_off(setting, value.strip())
        elif setting == "reasoning":
            view.reasoning = check_shown(value.strip())
        elif setting == "reasoning_effort":  # a chat-template variable: the next prompt renders with it
            chat.template_vars = opt.reasoning_vars(chat.template_vars, value.strip())
        elif setting not in SETTINGS:
            raise UsageError(f"unknown setting {setting!r}",
                             f"settable: {', '.join([*SETTINGS, 'markdown', 'reasoning', 'reasoning_effort'])}")
        else:
            chat.set(setting, value.strip())
        console.print(f"[dim]{escape(setting)} = {escape(value.strip())}[/dim]")
    elif name == "stats":
        console.print(stats_table(chat, view))
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


def loading_message(source: str) -> str:
    """What the loading spinner says: a first launch on a machine also builds the CPU kernels."""
    import jax

    from moecli.kernels.cpu import ffi

    if jax.default_backend() == "cpu" and not ffi.is_built():
        return f"loading {source}; building the CPU kernels first, once per machine (~15-30 s) ..."
    return f"loading {source} ..."


def quietly(fn, *args) -> None:
    """fn(*args) in a background thread whose failure must not surface there: the same work is done
    again, in the foreground, where an error is reported properly."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass


@command("chat")
def chat(
    model: Optional[str] = opt.Model, revision: Optional[str] = opt.Revision,
    max_tokens: int = opt.MaxTokens, temperature: float = opt.Temperature, top_p: float = opt.TopP,
    top_k: int = opt.TopK, min_p: float = opt.MinP, repetition_penalty: float = opt.RepetitionPenalty,
    seed: Optional[int] = opt.Seed, system: Optional[str] = opt.System, stop: Optional[List[str]] = opt.Stop,
    dtype: str = opt.Dtype, context: Optional[int] = opt.Context, devices: Optional[int] = opt.Devices,
    quantize: Optional[str] = opt.Quantize, template_var: Optional[List[str]] = opt.TemplateVar,
    markdown: bool = typer.Option(True, "--markdown/--no-markdown",
                                  help="Show replies as Markdown (a newline stays a line break), or as plain text."),
    reasoning: str = opt.Reasoning, reasoning_effort: Optional[str] = opt.ReasoningEffort,
) -> None:
    """Chat with a model in an interactive REPL (/help lists the commands)."""
    from moecli.inference.text import load
    from moecli.inference.conversation import ChatSession
    from moecli.errors import UsageError
    from moecli.text.reasoning import check_shown

    params = opt.sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed, max_tokens)
    variables = opt.reasoning_vars(opt.template_vars(template_var), reasoning_effort)
    show_reasoning = check_shown(reasoning)
    if context is not None and context <= 0:
        raise UsageError(f"the context window must be positive, got --context {context}", "e.g. --context 4096")
    console = Console(highlight=False)
    source = opt.model_source(model)
    with console.status(loading_message(source)):
        m, tokenizer = load(source, dtype=dtype, revision=revision, devices=devices, quantize=quantize)
    session = ChatSession(m, tokenizer, params, context=context, system=system,
                          stop=tuple(stop or ()), model_id=source, revision=revision, template_vars=variables,
                          notify=lambda text: console.print(f"[yellow]{escape(text)}[/yellow]"))
    console.print(f"[bold]moe chat[/bold] · {source} · context {session.decoder.max_len} tokens · "
                  "/help for commands, Ctrl-D to leave")
    read, view = make_input(console), View(markdown=markdown, reasoning=show_reasoning)
    # Compile while the user types the first message (a first launch's ~10 s; later launches find
    # the programs in the persistent compilation cache). The first reply waits for it if needed.
    warm_up = threading.Thread(target=quietly, args=(session.decoder.precompile, (32, 64)), daemon=True)
    warm_up.start()
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
                if not run_command(console, session, line.strip(), view):
                    break
                continue
            with Interrupt() as interrupt:
                if warm_up.is_alive():  # polled, so Ctrl-C here stops the reply, never the process
                    with console.status("compiling the model, once per model (later launches take ~2 s) ..."):
                        while warm_up.is_alive() and not interrupt.requested:
                            warm_up.join(0.1)
                stream_reply(console, session.reply_segments(line, should_stop=lambda: interrupt.requested),
                             view.markdown, view.reasoning)
            notice = session.stop_notice()  # [interrupted], or the context window is full
            if notice:
                console.print(f"[yellow]{escape(notice)}[/yellow]")
        except Exception as err:  # noqa: BLE001 - a failed reply must not lose the conversation
            if DEBUG["on"]:
                traceback.print_exc()  # --debug: the whole traceback, and the conversation still goes on
            if isinstance(err, MoecliError):
                report(err)  # one line
            else:
                print(f"error: generation failed ({type(err).__name__}: {first_line(err)}) — the "
                      "conversation is kept; /save it or try again", file=sys.stderr)
    warm_up.join()  # a compile still running must finish before the process exits under it
    console.print("[dim]bye[/dim]")
