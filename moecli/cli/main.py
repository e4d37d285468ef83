"""The `moe` console script: the Typer app of `moecli.cli.app` with every command registered.

Each module under `moecli/cli/commands/` registers its command when imported; importing them here,
not in `app.py`, keeps the commands -> app dependency one-way. The command modules import JAX and the
model only inside their functions, so `moe --help` and argument errors answer without loading them.
"""
from __future__ import annotations

from moecli.cli.app import app
from moecli.cli.commands import bench, chat, download, generate, info, quantize, serve, train  # noqa: F401 (registration)

__all__ = ["app"]
