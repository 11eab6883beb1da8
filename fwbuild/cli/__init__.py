"""The `fwbuild` command line: click commands only.

Each command parses its arguments, calls the core, prints the result. Core errors
(`FwbuildError`) become `Error: <what> (<where>)` + `Hint:` on stderr and exit
code 1 (failure) or 2 (bad usage, bad recipe); with a command's --json, one JSON
object on stdout instead (same exit code). Global -q/-v and the progress display
live in `_common.py`. The commands live in one module
per command group (`cmd_*.py`) to keep each module short; they import the core
lazily so that `fwbuild eeprom edit` starts fast.
"""

from __future__ import annotations

import errno
import re
from typing import Any

import click

from .. import __version__
from ..errors import FwbuildError
from ._common import CliState, emit_json, error_object, print_error, state


def _json_requested(ctx: click.Context) -> bool:
    """--json was asked for: by its callback, or (when parsing failed first) on the command line."""
    return state().json or "--json" in ctx.args or "--json" in getattr(ctx, "_protected_args", [])


class FwbuildGroup(click.Group):
    """A group that renders core errors instead of tracebacks (as JSON with --json)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FwbuildError as exc:
            print_error(exc)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                ctx.exit(1)
            what = exc.strerror or str(exc)
            where = str(exc.filename) if exc.filename else None
            if _json_requested(ctx):
                emit_json(error_object(what, where, None, 1))
            else:
                click.echo(f"Error: {what}" + (f" ({where})" if where else ""), err=True)
            ctx.exit(1)
        except click.ClickException as exc:
            if not _json_requested(ctx):
                raise
            failed: click.Context | None = getattr(exc, "ctx", None)
            command = failed.command_path if failed is not None else "fwbuild"
            emit_json(error_object(exc.format_message(), command, f"see `{command} --help`", exc.exit_code))
            ctx.exit(exc.exit_code)
        except click.exceptions.Abort:
            if not _json_requested(ctx):
                raise
            emit_json(error_object("aborted", None, None, 1))
            ctx.exit(1)


@click.group(cls=FwbuildGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fwbuild")
@click.option("-q", "--quiet", is_flag=True, help="Print only results and errors (no progress, no notes).")
@click.option("-v", "--verbose", is_flag=True, help="Also print each step as it starts and every finished task.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """Build and serve what a Raspberry Pi 5 needs to boot as a distant VPN node.

    Release engineers: `fwbuild build RECIPE`, then `fwbuild verify OUTDIR`.
    Admins: `fwbuild recovery ...`. The server: `fwbuild serve --config server.toml`.
    """
    if quiet and verbose:
        raise click.UsageError("-q and -v exclude each other")
    current = ctx.ensure_object(CliState)
    current.quiet, current.verbose = quiet, verbose


# "e.g." and "i.e." end no sentence: click's default summary would stop at their period.
_ABBREVIATIONS = re.compile(r"\b(e\.g|i\.e|etc|cf|vs)\.", re.IGNORECASE)


def summary_of(help_text: str) -> str:
    """The whole first sentence of a command's help: not cut at "e.g." nor inside parentheses."""
    first = " ".join(help_text.strip().split("\n\n", 1)[0].split())
    masked = _ABBREVIATIONS.sub(lambda m: m.group(0).replace(".", "\0"), first)
    depth = 0
    end = len(masked)
    for index, char in enumerate(masked):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif char == "." and depth == 0 and (index + 1 == len(masked) or masked[index + 1] == " "):
            end = index
            break
    return masked[:end].replace("\0", ".")


def _fix_summaries(command: click.Command) -> None:
    if command.short_help is None and command.help:
        command.short_help = summary_of(command.help)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _fix_summaries(sub)


def _register() -> None:
    import server.cli  # the CLI registration point: the only import of `server` under fwbuild/

    from . import (
        cmd_bootimg,
        cmd_completion,
        cmd_eeprom,
        cmd_initramfs,
        cmd_recovery,
        cmd_rootfs,
        cmd_virtual,
        commands_core,
    )

    for module in (commands_core, cmd_eeprom, cmd_initramfs, cmd_bootimg, cmd_recovery,
                   cmd_virtual, cmd_rootfs, cmd_completion):
        for command in module.COMMANDS:
            main.add_command(command)
    server.cli.register(main)
    _fix_summaries(main)


_register()
