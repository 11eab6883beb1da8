"""Commands: virtual-node."""

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


@virtual_group.command("demo")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("recipes/virtual.toml"), show_default=True, help="The virtual recipe.")
@click.option("--out", "out_root", type=click.Path(file_okay=False, path_type=Path), default=Path("out"),
              show_default=True, help="Output root of the build.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("keys"),
              show_default=True, help="Site keys (created when missing).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo"),
              show_default=True, help="Server state, sshd files, node images, console logs.")
@click.option("--mac", default="dc:a6:32:00:00:01", show_default=True, help="The virtual node's Ethernet MAC.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds for the node to boot.")
def demo_cmd(recipe: Path, out_root: Path, keys_dir: Path, work: Path, mac: str, timeout: float) -> None:
    """The whole system on this machine: build, serve, enroll a node, boot it over the VPN.

    Builds and verifies the virtual artifact set, starts the server and an OpenSSH
    entrypoint on 127.0.0.1 (needs root, for sshd), enrolls a virtual Pi 5, boots its
    own EEPROM image in QEMU (HTTP boot, signature checks, SSH certificate, sshfs root)
    and prints where everything is.
    """
    from server.virtual_site import run_demo

    report = run_demo(recipe, out_root=out_root, keys_dir=keys_dir, work=work, mac=mac,
                      timeout=timeout, log=lambda line: click.echo(f"[demo] {line}"))
    click.echo("")
    click.echo(f"artifact set   {report.out_dir}  (manifest.json lists every file)")
    for rel in ("eeprom/enforced/pieeprom.bin", "initramfs/initramfs_2712", "bootimg/boot.img",
                "recovery/rpi-5-sd-recovery.tar.gz"):
        click.echo(f"               {report.out_dir / rel}")
    click.echo(f"node EEPROM    {report.node_eeprom}  (0600: holds the node's credentials)")
    click.echo(f"server config  {report.config}")
    click.echo(f"console log    {report.console_log}")
    if not report.result.ok:
        click.echo(f"Error: the virtual node did not boot: {report.result.reason} ({report.console_log})",
                   err=True)
        raise SystemExit(1)
    click.echo(f"OK: the virtual node {report.result.reason} via {report.result.mode} boot")


COMMANDS = [virtual_group]
