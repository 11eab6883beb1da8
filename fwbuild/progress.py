"""Progress reporting from the core: a callback, never a print.

`Progress(label, done, total)`: `done` units of `total` (None when unknown) for the
task named `label`. The CLI renders it (fwbuild/cli/_common.py `Display`); tests pass None.

A reporter may also take two optional methods, which the core calls when present:
`task_unit(label, unit)` (say once that a task counts "bytes", so the display shows
MB and MB/s) and `step(name, state, number, count, elapsed)` (a build step is
"started", or finished as "built" or "cached" after `elapsed` seconds). A plain
callable still works: it just sees the task updates.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, "int | None"], None]

BYTES = "bytes"


def report(progress: Progress | None, label: str, done: int, total: int | None) -> None:
    if progress is not None:
        progress(label, done, total)


def report_bytes(progress: Progress | None, label: str, done: int, total: int | None) -> None:
    """A task that counts bytes (a download, a card write): shown with MB and MB/s."""
    if progress is None:
        return
    set_unit = getattr(progress, "task_unit", None)
    if set_unit is not None:
        set_unit(label, BYTES)
    progress(label, done, total)


def step_event(progress: Progress | None, name: str, state: str, number: int, count: int,
               elapsed: float = 0.0) -> None:
    """A build step `name` (`number` of `count`) is "started", "built" or "cached"."""
    handler = getattr(progress, "step", None)
    if handler is not None:
        handler(name, state, number, count, elapsed)
