"""The `moe` command line: one Typer app, one place where errors become messages.

Each command lives in `moecli/commands/`; this module registers them through `command()`, which
wraps every command in the same handler: a `MoecliError` becomes one line on stderr ("error: what
is wrong — what to do") and its exit code; Ctrl-C exits with 130; device out-of-memory becomes a
`ResourceError`. A traceback is shown only with `moe --debug ...` (or MOECLI_DEBUG=1).
"""
from __future__ import annotations

import functools
import os
import sys

import typer

from moecli.errors import MoecliError, ResourceError

app = typer.Typer(
    name="moe",
    help="Run Mixture-of-Experts language models from a terminal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DEBUG = {"on": os.environ.get("MOECLI_DEBUG", "") not in ("", "0")}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """Run Mixture-of-Experts language models from a terminal."""
    DEBUG["on"] = DEBUG["on"] or debug


def as_moecli_error(err: BaseException) -> MoecliError | None:
    """Errors raised by libraries that deserve a one-line message too."""
    text = str(err)
    if isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
        return ResourceError(f"out of memory ({text.splitlines()[0][:200] if text else 'MemoryError'})",
                             "use --dtype bfloat16, more --devices, or a smaller model")
    return None


def report(err: MoecliError) -> int:
    print(f"error: {err.one_line()}", file=sys.stderr)
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

        app.command(name, **kwargs)(guarded)
        return fn

    return register


def _register_commands() -> None:
    """Import the command modules; each registers itself with `command`."""
    import importlib

    for module in ("download", "generate", "chat", "train", "bench"):
        try:
            importlib.import_module(f"moecli.commands.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"moecli.commands.{module}":
                raise


_register_commands()
