"""The live progress display (rich), imported only when a terminal shows it.

rich is a maintained library that redraws several bars in place, handles terminal
width and non-UTF-8 terminals; it costs ~35 ms to import, so `_common.Display`
imports this module only when it draws on a terminal.
"""

from __future__ import annotations

from typing import IO, Any

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


class AmountColumn(ProgressColumn):
    """`12.3/45.6 MB  8.1 MB/s` for byte tasks, `3/6` for counted ones."""

    def render(self, task: Task) -> Text:
        if task.fields.get("unit") == "bytes":
            total = f"/{decimal(int(task.total))}" if task.total else ""
            speed = task.finished_speed or task.speed
            rate = f"  {decimal(int(speed))}/s" if speed else ""
            return Text(f"{decimal(int(task.completed))}{total}{rate}")
        if task.total is None:
            return Text(f"{int(task.completed)}")
        return Text(f"{int(task.completed)}/{int(task.total)}")


def live_progress(stream: IO[str]) -> Any:
    console = Console(file=stream)
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), AmountColumn(),
                    TimeElapsedColumn(), console=console, transient=True)
