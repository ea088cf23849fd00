"""What a long job shows while it runs: one live progress display per stage, or only stage lines for logs."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

Progress = Callable[..., None]
"""progress(done, total, unit="items", note="") reports `done` of `total` units; a new unit starts a new count."""


class Display(Protocol):
    def stage(self, name: str) -> Iterator[Progress]:
        """A context manager around one stage; what it yields receives the stage's progress."""


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


class LineDisplay:
    """A line when a stage starts and one when it ends, nothing in between: for logs, CI and `--quiet`."""

    def __init__(self, write: Callable[[str], None] = print):
        self.write = write

    @contextmanager
    def stage(self, name: str) -> Iterator[Progress]:
        self.write(f"[{name}] ...")
        started = time.perf_counter()
        yield lambda done, total, unit="items", note="": None
        self.write(f"[{name}] done in {time.perf_counter() - started:.0f} s")


class StageElapsedColumn(ProgressColumn):
    """Time since the stage began, which a restarted count (a new unit) does not reset."""

    def render(self, task) -> Text:
        return Text(f"{format_seconds(time.perf_counter() - task.fields['started'])} elapsed",
                    style="progress.elapsed")


class LiveDisplay:
    """One rich progress display per stage: its name, what it counts, done / total, the stage's elapsed time, ETA.

    A stage that counts several things in turn (anchors, then training steps) restarts its count, and so its ETA,
    at each new unit; the elapsed time stays the stage's. A stage that fails leaves no line behind.
    """

    def __init__(self, console):
        self.console = console

    @contextmanager
    def stage(self, name: str) -> Iterator[Progress]:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                   TextColumn("{task.fields[unit]}"), StageElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(compact=True), TextColumn("{task.fields[note]}"))
        with RichProgress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(name, total=None, unit="", note="", started=time.perf_counter())
            current_unit = None

            def update(done: int, total: int, unit: str = "items", note: str = "") -> None:
                nonlocal current_unit
                if unit != current_unit:
                    progress.reset(task, total=total, completed=0)
                    current_unit = unit
                progress.update(task, completed=done, total=total, unit=unit, note=note)

            try:
                yield update
            except BaseException:
                progress.update(task, visible=False)  # what went wrong is said once, by the caller, on its own line
                raise
