"""The `fwbuild` command line: click commands only.

Each command parses its arguments, calls the core, prints the result. Core errors
(`FwbuildError`) become `Error: <what> (<where>)` + `Hint:` on stderr and exit
code 1 (failure) or 2 (bad usage, bad recipe). The commands live in one module
per command group (`cmd_*.py`) to keep each module short; they import the core
lazily so that `fwbuild eeprom edit` starts fast.
"""

from __future__ import annotations

import errno
from typing import Any

import click

from .. import __version__
from ..errors import FwbuildError
from ._common import print_error


class FwbuildGroup(click.Group):
    """A group that renders core errors instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FwbuildError as exc:
            print_error(exc)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                ctx.exit(1)
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"Error: {exc.strerror or exc}{where}", err=True)
            ctx.exit(1)


@click.group(cls=FwbuildGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fwbuild")
def main() -> None:
    """Build and serve what a Raspberry Pi 5 needs to boot as a distant VPN node.

    Release engineers: `fwbuild build RECIPE`, then `fwbuild verify OUTDIR`.
    Admins: `fwbuild recovery ...`. The server: `fwbuild serve --config server.toml`.
    """


def _register() -> None:
    from . import (
        cmd_bootimg,
        cmd_eeprom,
        cmd_initramfs,
        cmd_recovery,
        cmd_rootfs,
        cmd_server,
        cmd_virtual,
        commands_core,
    )

    for module in (commands_core, cmd_eeprom, cmd_initramfs, cmd_bootimg, cmd_recovery, cmd_server,
                   cmd_virtual, cmd_rootfs):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
