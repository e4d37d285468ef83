"""The `moe` command line."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="moe",
    help="Run Mixture-of-Experts language models from a terminal.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Run Mixture-of-Experts language models from a terminal."""
