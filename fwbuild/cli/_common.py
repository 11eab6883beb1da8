"""Shared CLI plumbing: output modes (-q/-v/--json), error rendering, the progress display.

A command adopts them with one call each:
  `@json_option`                    adds --json; errors then print as one JSON object on stdout
  `emit_json(obj)` / `state()`      print the result as JSON / read -q, -v, --json
  `with progress_display() as p:`   a progress callback for the core (`p` goes where `progress=` goes)
  `note(text)`                      an informational line on stderr (silenced by -q and --json)
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from ..errors import FwbuildError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class CliState:
    """The global output options (`fwbuild -q|-v CMD`) and the command's --json."""

    quiet: bool = False
    verbose: bool = False
    json: bool = False


def state() -> CliState:
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return CliState()
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState()
    return root.obj


def _mark_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        state().json = True
    return value


json_option = click.option(
    "--json", "as_json", is_flag=True, is_eager=True, callback=_mark_json,
    help="Print the result as one JSON object on stdout (errors too: error, where, hint, exit_code).")


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def note(text: str) -> None:
    """An informational line on stderr: not with -q (nor with --json unless -v)."""
    current = state()
    if current.quiet or (current.json and not current.verbose):
        return
    click.echo(text, err=True)


def error_object(what: str, where: str | None, hint: str | None, exit_code: int,
                 details: list[str] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"error": what, "where": where, "hint": hint, "exit_code": exit_code}
    if details:
        obj["details"] = details
    return obj


def print_error(exc: FwbuildError) -> None:
    details: list[str] = list(getattr(exc, "details", []) or [])
    if state().json:
        emit_json(error_object(exc.what, exc.where, exc.hint, exc.exit_code, details))
        return
    click.echo(f"Error: {exc}", err=True)
    for line in details:
        click.echo(f"  {line}", err=True)
    if exc.hint:
        click.echo(f"Hint: {exc.hint}", err=True)


_WRITE_HINTS = {
    errno.EACCES: "you may not write there: choose another directory (or fix its permissions)",
    errno.EPERM: "you may not write there: choose another directory (or fix its permissions)",
    errno.EROFS: "that file system is read-only: choose another directory",
    errno.ENOSPC: "the disk is full: free space or choose another directory",
    errno.ENOTDIR: "a part of that path is a file, not a directory",
    errno.EISDIR: "that is a directory: name a file",
}


def write_failure(exc: OSError, option: str, path: Path | str, what: str = "cannot write the output") -> FwbuildError:
    """An output that cannot be written, blamed on the option that named it (never a temp name)."""
    from ..errors import UsageError

    reason = (exc.strerror or str(exc)).lower()
    hint = _WRITE_HINTS.get(exc.errno or 0)
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocking = next((p for p in Path(path).parents if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            reason, hint = f"{blocking} is a file, not a directory", "choose another path"
    if hint is None and exc.errno == errno.ENOENT:
        parent = Path(path).parent
        hint = (f"{parent} takes no new files (a virtual file system such as /proc or /sys?): "
                "choose a normal directory" if parent.is_dir()
                else f"{parent} does not exist: create it first or choose another directory")
    hint = hint or "choose another location"
    return UsageError(f"{what}: {reason}", f"{option} {path}", hint)


@contextmanager
def writing(option: str, path: Path | str) -> Iterator[None]:
    """Report a failed write of an output as `write_failure` (blaming `option PATH`)."""
    try:
        yield
    except OSError as exc:
        raise write_failure(exc, option, path) from None


@contextmanager
def recipe_in_hints(recipe: Path) -> Iterator[None]:
    """Hints written for any recipe say `fwbuild fetch RECIPE`: name the user's recipe file."""
    try:
        yield
    except FwbuildError as exc:
        if exc.hint and "fwbuild fetch RECIPE" in exc.hint:
            exc.hint = exc.hint.replace("fwbuild fetch RECIPE", f"fwbuild fetch {shlex.quote(str(recipe))}")
        raise


def format_epoch(ts: int) -> str:
    """An epoch with its date and zone: `1767225600 (2026-01-01 00:00:00 UTC)`."""
    from datetime import UTC, datetime

    try:
        when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(ts)
    return f"{ts} ({when})"


def human_bytes(count: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"  # pragma: no cover


# --- progress ---------------------------------------------------------------------------

@dataclass
class _Task:
    unit: str = ""
    started: float = 0.0
    done: int = 0
    total: int | None = None
    finished: bool = False
    handle: Any = None  # the rich task id (live mode)


class Display:
    """Renders core progress: steps (built/cached, elapsed) and tasks (bytes with MB/s).

    Modes: "live" (a rich display on a terminal), "plain" (one line per finished step
    and per finished byte task: logs, pipes) and "off" (-q, or tests).
    """

    def __init__(self, mode: str, stream: IO[str] | None = None, verbose: bool = False,
                 title: str = "") -> None:
        self.mode = mode
        self.stream = stream if stream is not None else sys.stderr
        self.verbose = verbose
        self.title = title
        self._tasks: dict[str, _Task] = {}
        self._live: Any = None
        self._overall: Any = None

    # core callbacks
    def task_unit(self, label: str, unit: str) -> None:
        self._task(label).unit = unit

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if self.mode == "off":
            return
        task = self._task(label)
        if task.finished and done < task.done:
            task.finished, task.started = False, time.monotonic()  # the same label again
        task.done, task.total = done, total
        if self.mode == "live":
            self._live_update(label, task)
        if total is not None and done >= total and not task.finished:
            task.finished = True
            if self.mode == "plain" and (task.unit or self.verbose):
                self._line(f"  {label}: {self._amount(task)}")
            if self.mode == "live" and task.unit:
                self._live_print(f"  {label}: {self._amount(task)}")

    def step(self, name: str, state: str, number: int, count: int, elapsed: float) -> None:
        if self.mode == "off":
            return
        prefix = f"[{number}/{count}] {name}"
        if state == "started":
            if self.mode == "plain" and self.verbose:
                self._line(f"{prefix} ...")
            if self.mode == "live":
                self._live_step(name, number, count)
            return
        line = f"{prefix}: {state} in {elapsed:.1f} s"
        if self.mode == "live":
            self._live_print("✓ " + line)
            self._drop_tasks()
            if self._overall is not None:
                self._live.update(self._overall, completed=number)
        else:
            self._line(line)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # helpers
    def _task(self, label: str) -> _Task:
        task = self._tasks.get(label)
        if task is None:
            task = self._tasks[label] = _Task(started=time.monotonic())
        return task

    def _amount(self, task: _Task) -> str:
        elapsed = max(time.monotonic() - task.started, 1e-6)
        if task.unit == "bytes":
            rate = task.done / elapsed / 1e6
            return f"{human_bytes(task.done)} in {elapsed:.1f} s ({rate:.1f} MB/s)"
        return f"{task.done}/{task.total} in {elapsed:.1f} s"

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _start_live(self) -> None:
        if self._live is not None:
            return
        from ._live import live_progress  # rich costs ~35 ms to import: only for a live display

        self._live = live_progress(self.stream)
        self._live.start()

    def _live_step(self, name: str, number: int, count: int) -> None:
        self._start_live()
        description = f"{self.title} [{number}/{count}] {name}".strip()
        if self._overall is None:
            self._overall = self._live.add_task(description, total=count, completed=number - 1)
        else:
            self._live.update(self._overall, description=description, completed=number - 1)

    def _live_update(self, label: str, task: _Task) -> None:
        self._start_live()
        if task.handle is None:
            task.handle = self._live.add_task(f"  {label}", total=task.total, unit=task.unit)
        self._live.update(task.handle, completed=task.done, total=task.total)

    def _live_print(self, text: str) -> None:
        self._start_live()
        self._live.console.print(text, markup=False, highlight=False)

    def _drop_tasks(self) -> None:
        for label, task in list(self._tasks.items()):
            if task.handle is not None:
                self._live.remove_task(task.handle)
            del self._tasks[label]


def display_mode(stream: IO[str] | None = None) -> str:
    """live on a terminal (stdout and stderr both; not TERM=dumb), plain lines otherwise, off with -q."""
    current = state()
    if current.quiet:
        return "off"
    stream = stream if stream is not None else sys.stderr
    if current.json or not (_isatty(stream) and _isatty(sys.stdout)) or os.environ.get("TERM") == "dumb":
        return "plain"
    return "live"


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def progress_display(title: str = "") -> Iterator[Display]:
    """The progress callback for a command; the display is closed on the way out."""
    display = Display(display_mode(), verbose=state().verbose, title=title)
    try:
        yield display
    finally:
        display.close()


def existing_file() -> click.Path:
    return click.Path(exists=True, dir_okay=False, readable=True)
