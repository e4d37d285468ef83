"""The `moe` command line: one Typer app, one place where errors become messages.

Each command lives in `moecli/cli/commands/` and registers itself through `command()`, which
wraps every command in the same handler: a `MoecliError` becomes one line on stderr ("error: what
is wrong — what to do") and its exit code; Ctrl-C exits with 130; device out-of-memory becomes a
`ResourceError`. A traceback is shown only with `moe --debug ...` (or MOECLI_DEBUG=1).

Help texts are Markdown (so "[default: ...]" in a help string is shown as written, where rich markup
would swallow it as a style tag), and flags are shown without a value type. Nothing here imports
JAX: `moe --help`, `moe --version` and argument errors answer at once.
"""
from __future__ import annotations

import functools
import sys

import typer
from typer.core import TyperCommand, TyperGroup

from moecli import __version__, env
from moecli.errors import MoecliError, ResourceError, first_line


class FlagsTakeNoValue:
    """Typer's rich help labels every flag with a type, `--verbose <bool>`, though a flag takes no
    value (its plain help leaves the type out); an empty metavar leaves it out here too."""

    def format_help(self, ctx, formatter) -> None:
        for param in self.get_params(ctx):
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        super().format_help(ctx, formatter)


class MoeGroup(FlagsTakeNoValue, TyperGroup):
    """`moe` itself."""


class MoeCommand(FlagsTakeNoValue, TyperCommand):
    """Each `moe COMMAND`."""


def usage_message(err) -> str:
    """Click's message on one line, without its final period (ours follows: " — see ...")."""
    message = " ".join(err.format_message().split())
    return message[:-1] if message.endswith(".") and not message.endswith("..") else message


class MoeApp(typer.Typer):
    """A Typer app whose command-line mistakes (unknown flag, bad value, missing argument) are one
    line too, instead of click's boxed usage panel."""

    def __call__(self, *args, **kwargs):
        # typer >= 0.24 vendors click; its UsageError is BadParameter's base class either way.
        usage_error = typer.BadParameter.__mro__[1]
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except usage_error as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # bare `moe`: show the help
                print(err.ctx.get_help() if err.ctx else "", file=sys.stderr)
                sys.exit(2)
            where = err.ctx.command_path if err.ctx else guess_command(kwargs.get("args") or sys.argv[1:])
            print(f"error: {usage_message(err)} — see `{where} --help`", file=sys.stderr)
            sys.exit(2)
        except typer.Abort:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def guess_command(argv) -> str:
    """`moe NAME` for the first word of argv that names a command (a few click errors, such as
    "Option '-p' requires an argument", come without the context that would say which)."""
    names = {info.name for info in app.registered_commands}
    return next((f"moe {word}" for word in argv if word in names), "moe")


app = MoeApp(
    name="moe",
    cls=MoeGroup,
    rich_markup_mode="markdown",
    help="Run Mixture-of-Experts language models from a terminal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DEBUG = {"on": False}  # set by --debug or MOECLI_DEBUG (read in `main`)


def print_version(wanted: bool) -> None:
    if wanted:
        print(f"moe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True, expose_value=False,
                                 help="Print the version and exit."),
) -> None:
    """Run Mixture-of-Experts language models from a terminal."""
    env.override("MOECLI_DEBUG", "1" if debug else None)  # code far from the CLI (kernel self-checks) sees it
    DEBUG["on"] = env.switch("MOECLI_DEBUG")


def as_moecli_error(err: BaseException) -> MoecliError | None:
    """Errors raised by libraries that deserve a one-line message too: running out of host memory
    (MemoryError) or device memory (XLA's RESOURCE_EXHAUSTED), while loading or generating."""
    text = str(err)
    if isinstance(err, MemoryError):
        return ResourceError("out of host memory" + (f" ({first_line(text, 160)})" if text else ""),
                             "use --dtype bfloat16 (half the memory of float32), a smaller model, or free host memory")
    lowered = text.lower()
    if "resource_exhausted" in lowered or "resource exhausted" in lowered or "out of memory" in lowered:
        return ResourceError(_oom_message(text), OOM_HINT)
    return None


OOM_HINT = "use --dtype bfloat16 (half the memory of float32), --devices N to spread the model, or a smaller model"


def _oom_message(text: str) -> str:
    """'out of device memory: could not allocate 2.0 GiB (3.1 GiB free on cuda:0 (...))'."""
    import re

    from moecli.hub.progress import human_bytes

    found = (re.search(r"allocate (?:request for )?[^(]*?\((\d+)B\)", text)
             or re.search(r"allocat\w* (\d+) bytes", text) or re.search(r"(\d+) bytes", text))
    needed = f"could not allocate {human_bytes(int(found.group(1)))}" if found else first_line(text, 160)
    try:
        from moecli.checkpoints.loader import available_memory

        free = available_memory()
    except Exception:  # noqa: BLE001 - the figure is a courtesy; the device may be in a bad state
        free = None
    where = f"; {human_bytes(free.free)} free {free.where}" if free is not None else ""
    return f"out of {'host' if free is not None and not free.accelerator else 'device'} memory: {needed}{where}"


def report(err: MoecliError) -> int:
    """Print `error: what — fix` as exactly one line on stderr; return the exit code."""
    line = " ".join(err.one_line().split())  # a message quoting a library may hold newlines
    print(f"error: {line}", file=sys.stderr)
    return err.exit_code


def command(name: str, **kwargs):
    """Register `fn` as `moe NAME` behind the shared error handler."""

    def register(fn):
        @functools.wraps(fn)
        def guarded(*args, **kw):
            try:
                return fn(*args, **kw)
            except typer.Exit:
                raise
            except MoecliError as err:
                if DEBUG["on"]:
                    raise
                raise typer.Exit(report(err)) from None
            except KeyboardInterrupt:
                print("\ninterrupted", file=sys.stderr)
                raise typer.Exit(130) from None
            except Exception as err:  # noqa: BLE001 - turn known library failures into one line
                mapped = as_moecli_error(err)
                if mapped is None or DEBUG["on"]:
                    raise
                raise typer.Exit(report(mapped)) from None

        app.command(name, cls=MoeCommand, **kwargs)(guarded)
        return fn

    return register
