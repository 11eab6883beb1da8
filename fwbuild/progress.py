"""Progress reporting from the core: a callback, never a print.

`Progress(label, done, total)`: `done` units of `total` (None when unknown) for the
task named `label`. The CLI renders it as click progress bars; tests pass None.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, "int | None"], None]


def report(progress: Progress | None, label: str, done: int, total: int | None) -> None:
    if progress is not None:
        progress(label, done, total)
