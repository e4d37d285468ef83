"""What `moe train` shows while it works: one line per phase, the step bar, and the step log.

A training run has slow phases outside the steps themselves: building the CPU kernels (the
first run on a machine), compiling the step, the final validation in two routing modes. Each
runs under `Phases`: a spinner line saying what is happening (with a batch count where there
is one) while it runs, then a lasting line with what it produced and how long it took, so the
output doubles as a profile of the run:

    training the tokenizer (sentencepiece BPE, 2,048 tokens) (0.5 s)
    compiling the training step (once) (7.4 s)

Everything is laid out to fit an 80-column terminal: the step log is fixed-width columns, not
a line that wraps. (Used by `moecli.training.train` and `moecli.training.evaluation`.)
"""
from __future__ import annotations

import contextlib
import time


class Phase:
    """The handle a phase's block gets: `count(done, total)` updates the spinner line, and
    `detail` (set by the block) is added to the finished line."""

    def __init__(self, status, what: str):
        self.status, self.what, self.detail = status, what, ""

    def count(self, done: int, total: int) -> None:
        self.status.update(f"{self.what}: batch {done}/{total}")


class Phases:
    """`with phases("reading the corpus") as phase:` shows the phase while it runs, then one line
    (not if the block raises: the error is the last word)."""

    def __init__(self, console):
        self.console = console

    @contextlib.contextmanager
    def __call__(self, what: str):
        start = time.perf_counter()
        with self.console.status(what) as status:  # no "…": in this output it only ever means cut
            phase = Phase(status, what)
            yield phase
        detail = f": {phase.detail}" if phase.detail else ""
        self.console.print(f"{what}{detail} [dim]({time.perf_counter() - start:.1f} s)[/]", highlight=False)


def training_bar(console):
    """The step bar: the current activity ('train', or 'val 3/8' while validating), steps done,
    smoothed training loss, last validation loss, speed and time left. It fits 80 columns up to
    20,000 steps at a million tokens a second; elapsed time is in the step log instead."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold blue]{task.description:<9}"), BarColumn(bar_width=10), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA"), TimeRemainingColumn(compact=True),
        console=console, transient=False)


#: The step log, printed at every validation: (header, width) per column.
STEP_COLUMNS = (("step", 7), ("train", 8), ("val", 8), ("aux", 7), ("z", 8), ("drop", 7), ("tok/s", 11),
                ("minutes", 9))


def step_header() -> str:
    """The step log's header line (64 columns)."""
    return "".join(f"{name:>{width}}" for name, width in STEP_COLUMNS)


def step_row(step: int, train: float, val: float, aux: float, z: float, dropped: float, tps: float,
             minutes: float) -> str:
    """One line of the step log, under `step_header`. A value wider than its column widens the
    line rather than being cut."""
    cells = (f"{step}", f"{train:.4f}", f"{val:.4f}", f"{aux:.3f}", f"{z:.2f}", f"{100 * dropped:.1f}%",
             f"{tps:,.0f}", f"{minutes:.1f}")
    return "".join(f" {cell:>{width - 1}}" for cell, (_, width) in zip(cells, STEP_COLUMNS))
