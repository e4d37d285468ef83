"""`moe train`: train a small Mixtral-style MoE from scratch and save it as a Hugging Face checkpoint.

    moe train --out runs/bard                      # the bundled model's recipe (weights/bardmoe)
    moe train --out runs/bard --resume --steps 3000  # continue a run, here to a later step

The options are generated from `moecli.training.config.TrainConfig`, whose fields carry their flag,
help text and default, so this file declares only the two options that are not training settings
(--out and --resume). See `moecli.training.train` for the recipe and `moecli.training.data` for
the corpus and tokenizer.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import typer

from moecli.cli.app import command
from moecli.training.config import FIELDS, TrainConfig

KEYWORD = inspect.Parameter.KEYWORD_ONLY
HINTS = typing.get_type_hints(TrainConfig)


def setting_option(field: dataclasses.Field) -> inspect.Parameter:
    """The command-line parameter of one TrainConfig field, from its metadata."""
    meta = field.metadata
    default = meta.get("show", lambda value: value)(field.default)
    annotation = meta.get("cli_type", HINTS[field.name])
    if field.default is None:
        annotation = annotation | None
    return inspect.Parameter(field.name, KEYWORD, annotation=annotation,
                             default=typer.Option(default, meta["flag"], help=meta["help"]))


def settings(ctx: typer.Context, values: dict) -> tuple[dict, dict]:
    """(every setting, the settings given on the command line), as TrainConfig values."""
    def value(name):
        parse = FIELDS[name].metadata.get("parse")
        return parse(values[name]) if parse and values[name] is not None else values[name]

    given = {name for name in values if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}
    every = {name: value(name) for name in values}
    return every, {name: every[name] for name in given}


def train(ctx: typer.Context, out: Path, resume: bool, **values) -> None:
    """Train a Mixtral-style MoE language model from scratch (float32, CPU or accelerator)."""
    from rich.console import Console

    console = Console()
    with console.status("starting: importing JAX"):  # a few seconds, before the first phase's line
        from moecli.training.train import run

    every, given = settings(ctx, values)
    if resume:
        run(None, out, resume=True, overrides=given, console=console)
    else:
        run(TrainConfig(**every), out, console=console)


train.__signature__ = inspect.Signature([
    inspect.Parameter("ctx", KEYWORD, annotation=typer.Context),
    inspect.Parameter("out", KEYWORD, annotation=Path, default=typer.Option(
        ..., "--out", "-o", help="Output folder: the exported checkpoint, plus train_state/.")),
    *(setting_option(field) for field in FIELDS.values() if field.metadata.get("flag")),
    inspect.Parameter("resume", KEYWORD, annotation=bool, default=typer.Option(
        False, "--resume", help="Continue the run saved in --out (its model and data settings are kept; "
        "--steps, --eval-interval and --checkpoint-interval may change).")),
])
command("train")(train)
