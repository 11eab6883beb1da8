"""Commands: virtual-node (its `demo` subcommand runs the server: server/cli/demo.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click


@click.group("virtual-node")
def virtual_group() -> None:
    """The virtual Pi 5: boot a node's EEPROM image end to end in QEMU."""


@virtual_group.command("boot")
@click.option("--eeprom", "eeprom", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The node's pieeprom.bin (its config and pubkey.bin drive the boot).")
@click.option("--sd", type=click.Path(exists=True, path_type=Path),
              help="Virtual SD card: a directory (boot partition) or a FAT image.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to reach the OS.")
@click.option("--marker", default="FWBUILD-NODE-OS-READY", show_default=True,
              help="Regex the OS prints on the serial console once it is up.")
@click.option("--restarts", type=int, default=2, show_default=True,
              help="How many BOOT_ORDER restarts (mode f) before giving up.")
@click.option("--guestfwd", multiple=True,
              help="QEMU guestfwd rule, e.g. tcp:10.0.2.100:22-tcp:127.0.0.1:2222 (repeatable).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to keep the kernel, initramfs and console log (default: a temp dir).")
@click.option("--console/--no-console", default=False, help="Print the guest's console at the end.")
def boot_cmd(eeprom: Path, sd: Path | None, timeout: float, marker: str, restarts: int,
             guestfwd: tuple[str, ...], workdir: Path | None, console: bool) -> None:
    """Boot a virtual node: exit 0 when it reached its OS, 1 with the reason otherwise."""
    from ..virtual.node import NodeOptions, boot_node

    work = workdir or Path(tempfile.mkdtemp(prefix="fwbuild-node-"))
    options = NodeOptions(eeprom=eeprom, workdir=work, sd=sd, timeout=timeout, marker=marker,
                          max_restarts=restarts, guestfwd=guestfwd)
    result = boot_node(options, log=lambda line: click.echo(f"[bootloader] {line}"))
    if console and result.console:
        click.echo(result.console)
    if not result.ok:
        click.echo(f"Error: the node did not boot: {result.reason} ({eeprom})", err=True)
        raise SystemExit(1)
    click.echo(f"OK: {result.reason} (console log: {work / 'console.log'})")


COMMANDS = [virtual_group]
