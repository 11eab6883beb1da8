"""Shared CLI plumbing: error rendering, progress bars, common option types."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import FwbuildError


def print_error(exc: FwbuildError) -> None:
    click.echo(f"Error: {exc}", err=True)
    if exc.hint:
        click.echo(f"Hint: {exc.hint}", err=True)


class BarProgress:
    """Renders core progress callbacks as click progress bars on stderr (one per label)."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: Any = None
        self._label: str | None = None
        self._done = 0

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if label != self._label:
            self.close()
            self._label = label
            self._done = 0
            self._bar = click.progressbar(length=total, label=label, file=sys.stderr)
            self._bar.__enter__()
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done
        if total is not None and done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
            self._label = None


def existing_file() -> click.Path:
    return click.Path(exists=True, dir_okay=False, readable=True)
