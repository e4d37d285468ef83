"""The `moe` command line: one Typer app, one place where errors become messages.

Each command lives in `moecli/cli/commands/` and registers itself through `command()`, which
wraps every command in the same handler: a `MoecliError` becomes one line on stderr ("error: what
is wrong — what to do") and its exit code; Ctrl-C exits with 130; device out-of-memory becomes a
`ResourceError`. A traceback is shown only with `moe --debug ...` (or MOECLI_DEBUG=1).
"""
from __future__ import annotations

import functools
import sys

import typer

from moecli import env
from moecli.errors import MoecliError, ResourceError

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
            where = err.ctx.command_path if err.ctx else "moe"
            print(f"error: {' '.join(err.format_message().split())} — see `{where} --help`", file=sys.stderr)
            sys.exit(2)
        except typer.Abort:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = MoeApp(
    name="moe",
    help="Run Mixture-of-Experts language models from a terminal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DEBUG = {"on": False}  # set by --debug or MOECLI_DEBUG (read in `main`)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """Run Mixture-of-Experts language models from a terminal."""
    DEBUG["on"] = debug or env.switch("MOECLI_DEBUG")


def as_moecli_error(err: BaseException) -> MoecliError | None:
    """Errors raised by libraries that deserve a one-line message too: running out of host memory
    (MemoryError) or device memory (XLA's RESOURCE_EXHAUSTED), while loading or generating."""
    text = str(err)
    if isinstance(err, MemoryError):
        return ResourceError("out of host memory" + (f" ({_first_line(text)[:160]})" if text else ""),
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
    needed = f"could not allocate {human_bytes(int(found.group(1)))}" if found else _first_line(text)[:160]
    try:
        from moecli.checkpoints.loader import available_memory

        free = available_memory()
    except Exception:  # noqa: BLE001 - the figure is a courtesy; the device may be in a bad state
        free = None
    where = f"; {human_bytes(free.free)} free {free.where}" if free is not None else ""
    return f"out of {'host' if free is not None and not free.accelerator else 'device'} memory: {needed}{where}"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


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

        app.command(name, **kwargs)(guarded)
        return fn

    return register
