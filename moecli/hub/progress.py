"""Download progress bars: the slice of tqdm's interface that `huggingface_hub.snapshot_download`
uses, drawn with rich on stderr (one bar for the files, one for the bytes); and the byte and count
formatting they share with the rest of moecli (`human_bytes`, `human_count`).

`moecli.hub.download` passes `_bar_class(_Progress(repo_id))` as snapshot_download's `tqdm_class`, unless
huggingface_hub's progress bars are disabled (HF_HUB_DISABLE_PROGRESS_BARS).
"""
from __future__ import annotations

import contextlib
import logging
import threading

from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


def _bars_disabled() -> bool:
    try:
        from huggingface_hub.utils import are_progress_bars_disabled
        return are_progress_bars_disabled()
    except ImportError:
        return False


@contextlib.contextmanager
def _quiet_hub_logs():
    """huggingface_hub logs a multi-line warning (with the URL) for every retried transfer; while moecli
    downloads, its progress bar and, on failure, its one-line error say what matters."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        log.setLevel(level)


class _Amount(ProgressColumn):
    """'12.3/45.6 MB  5.1 MB/s' for bytes, '3/7 files' for files."""

    def render(self, task) -> Text:
        if task.fields.get("unit") == "B":
            total = human_bytes(int(task.total)) if task.total else "?"
            speed = f"  {human_bytes(int(task.speed))}/s" if task.speed else ""
            return Text(f"{human_bytes(int(task.completed))} / {total}{speed}", style="progress.download")
        total = int(task.total) if task.total is not None else "?"
        return Text(f"{int(task.completed)}/{total} files", style="progress.download")


class _Progress(Progress):
    def __init__(self, repo_id: str):
        from rich.console import Console

        super().__init__(TextColumn("[progress.description]{task.description}"), BarColumn(), _Amount(),
                         TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self.repo_id = repo_id
        self.bytes_shown = False


class _Bar:
    """A tqdm stand-in for huggingface_hub that forwards to a rich progress task (or to nothing)."""

    progress: _Progress | None = None

    def __init__(self, iterable=None, desc=None, total=None, initial=0, unit="it", disable=False,
                 bar_format=None, **_):
        self.iterable, self.n, self._total, self.desc, self.unit = iterable, initial or 0, total, desc or "", unit
        self.task = None
        self._lock = threading.Lock()  # huggingface_hub's download threads share one bar
        progress = type(self).progress
        if progress is None or disable:
            return
        if unit == "B":
            # huggingface_hub draws two byte bars (network transfer, bytes written): show the one with a total
            if progress.bytes_shown or (bar_format and "total" not in bar_format):
                return
            progress.bytes_shown = True
            label = f"Downloading {progress.repo_id}"
        else:
            label = "Files"
        self.task = progress.add_task(label, total=total or None, completed=self.n, unit=unit)

    @property
    def total(self):
        return self._total

    @total.setter
    def total(self, value):
        self._total = value
        if self.task is not None:
            self.progress.update(self.task, total=value or None)

    @property
    def format_dict(self) -> dict:
        task = next((t for t in self.progress.tasks if t.id == self.task), None) if self.task is not None else None
        speed = task.speed if task is not None else None
        return {"n": self.n, "total": self._total, "rate": speed, "unit": self.unit}

    def update(self, n=1):
        with self._lock:
            self.n += n or 0
            if self.task is not None:
                self.progress.update(self.task, completed=self.n)

    def refresh(self, *_, **__):
        pass

    def set_description(self, desc=None, refresh=True):
        self.desc = desc or ""

    set_description_str = set_description

    def set_postfix_str(self, s="", refresh=True):
        pass

    def set_postfix(self, *_, **__):
        pass

    def clear(self, *_, **__):
        pass

    def close(self):
        pass

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _bar_class(progress: _Progress | None) -> type[_Bar]:
    return type("MoecliBar", (_Bar,), {"progress": progress})


def human_bytes(n: int) -> str:
    """Binary units: 64320 -> '62.8 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def human_count(n: int) -> str:
    """16080 -> '16.1K', 46_702_792_704 -> '46.7B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
