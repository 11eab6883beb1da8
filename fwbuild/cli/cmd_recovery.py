"""Commands: recovery archive / image / write."""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from ..errors import UsageError
from ..fsutil import atomic_write
from ..recovery.archive import pack_tar_gz
from ..recovery.device import SysfsProbe, describe_target, write_kit
from ..recovery.diskimage import recovery_disk_image
from ..recovery.kit import Kit, make_kit
from ._common import (
    emit_json,
    existing_file,
    format_epoch,
    json_option,
    note,
    progress_display,
    state,
    write_failure,
)

_from_option = click.option(
    "--from", "from_archive", type=existing_file(),
    help="An existing rpi-5-sd-recovery.tar.gz (instead of --eeprom).")
_eeprom_option = click.option(
    "--eeprom", "eeprom", type=existing_file(),
    help="The 2 MiB EEPROM image to flash (the recovery variant or a per-node image).")
_recovery_bin_option = click.option(
    "--recovery-bin", "recovery_bin", type=existing_file(),
    help="The Pi 5 recovery.bin (rpi-eeprom firmware-2712/recovery.bin).")
_virtual_option = click.option(
    "--virtual", is_flag=True,
    help="Use a FAKE recovery.bin (virtual tests only; it does nothing on a real board).")
_epoch_option = click.option(
    "--epoch", type=click.IntRange(0, 0xFFFFFFFF), help="Timestamps (default: SOURCE_DATE_EPOCH, else now).")


def _kit(from_archive: str | None, eeprom: str | None, recovery_bin: str | None, virtual: bool,
         epoch: int | None) -> Kit:
    def path(text: str | None) -> Path | None:
        return Path(text) if text else None

    kit = make_kit(path(from_archive), path(eeprom), path(recovery_bin), virtual, epoch)
    if kit.fake:
        note("note: using a FAKE recovery.bin (--virtual): not for real boards")
    return kit


def _warn_if_secret(kit: Kit, out: Path) -> None:
    if kit.private:
        note(f"note: this EEPROM image carries node credentials (WALT_VPN_CREDS): {out} is "
             "private (0600) and this kit does not wipe them from the board")


def _result(kind: str, target: Path, size: int, files: dict[str, str], epoch: int,
            **extra: object) -> dict[str, object]:
    return {"kind": kind, "path": str(target), "bytes": size, "files": files,
            "epoch": epoch, "private": extra.pop("private", False), **extra}


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


@click.group("recovery")
def recovery_group() -> None:
    """Make the SD-card EEPROM recovery kit: archive, disk image, or write it to a card."""


@recovery_group.command("archive")
@_eeprom_option
@_recovery_bin_option
@_virtual_option
@_epoch_option
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output .tar.gz (e.g. rpi-5-sd-recovery.tar.gz).")
@json_option
def recovery_archive_cmd(eeprom: str | None, recovery_bin: str | None, virtual: bool,
                         epoch: int | None, out: Path, as_json: bool) -> None:
    """Pack --eeprom IMAGE (any 2 MiB image, e.g. a node's) into a recovery .tar.gz."""
    kit = _kit(None, eeprom, recovery_bin, virtual, epoch)
    files, ts = kit.files, kit.epoch
    data = pack_tar_gz(files, ts)
    try:
        atomic_write(out, data, kit.mode)
    except OSError as exc:
        raise write_failure(exc, "--out", out) from None
    _warn_if_secret(kit, out)
    if as_json:
        emit_json(_result("archive", out, len(data), _digests(files), ts, private=kit.private))
        return
    click.echo(f"wrote {out} ({len(data)} bytes): {', '.join(sorted(files))}; "
               f"timestamps {format_epoch(ts)}")


@recovery_group.command("image")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@_from_option
@_eeprom_option
@_recovery_bin_option
@_virtual_option
@_epoch_option
@json_option
def recovery_image_cmd(out: Path, from_archive: str | None, eeprom: str | None,
                       recovery_bin: str | None, virtual: bool, epoch: int | None, as_json: bool) -> None:
    """Write OUT, a disk image (MBR + FAT32 partition) for dd or Raspberry Pi Imager."""
    try:
        is_disk = describe_target(out).block_device is not None
    except OSError as exc:
        raise write_failure(exc, "OUT", out) from None
    if is_disk:
        raise UsageError("`recovery image` writes image files; this is a disk", str(out),
                         "use `fwbuild recovery write` to write a card (it shows what will be erased)")
    kit = _kit(from_archive, eeprom, recovery_bin, virtual, epoch)
    image = recovery_disk_image(kit.files, kit.epoch)
    try:
        report = write_kit(out, image)
    except OSError as exc:
        raise write_failure(exc, "OUT", out) from None
    if kit.private and out.is_file():
        out.chmod(kit.mode)
    _warn_if_secret(kit, out)
    if as_json:
        emit_json(_result("image", out, report.bytes_written, report.files, kit.epoch,
                          private=kit.private))
        return
    click.echo(f"wrote {out} ({report.bytes_written} bytes; sparse): "
               f"{', '.join(sorted(report.files))}")


@recovery_group.command("write")
@click.argument("device", type=click.Path(dir_okay=False, path_type=Path))
@_from_option
@_eeprom_option
@_recovery_bin_option
@_virtual_option
@_epoch_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--allow-non-removable", is_flag=True,
              help="Accept a disk the kernel does not flag removable (some built-in SD readers).")
@click.option("--system-root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              hidden=True, help="Read sys/ and proc/ under this directory (tests).")
@json_option
def recovery_write_cmd(device: Path, from_archive: str | None, eeprom: str | None,
                       recovery_bin: str | None, virtual: bool, epoch: int | None, yes: bool,
                       allow_non_removable: bool, system_root: Path, as_json: bool) -> None:
    """Write the kit to DEVICE (an SD card, or a file), then read it back and verify it.

    Refuses a partition, the system disk, a mounted disk and (unless
    --allow-non-removable) a non-removable disk. Shows what will be erased and
    asks for confirmation unless --yes.
    """
    if as_json and not yes:
        raise UsageError("--json needs --yes (a prompt cannot be answered in JSON)", "--json",
                         "check the target first without --json, then run again with --yes --json")
    kit = _kit(from_archive, eeprom, recovery_bin, virtual, epoch)
    files, ts = kit.files, kit.epoch
    probe = SysfsProbe(system_root)
    try:
        info = describe_target(device, probe, allow_non_removable=allow_non_removable)
    except OSError as exc:
        raise write_failure(exc, "DEVICE", device) from None
    if as_json:
        note(info.describe())
    else:
        click.echo(info.describe())
    if not yes:
        click.confirm(f"Write the recovery kit to {device}?", abort=True)
    image = recovery_disk_image(files, ts)
    with progress_display(f"recovery write {device}") as display:
        try:
            report = write_kit(device, image, display, probe, allow_non_removable=allow_non_removable)
        except OSError as exc:
            raise write_failure(exc, "DEVICE", device) from None
    if as_json:
        emit_json(_result("write", device, report.bytes_written, report.files, ts,
                          block_device=report.block_device, verified=True, description=info.describe()))
        return
    if not state().quiet:
        for path, digest in sorted(report.files.items()):
            click.echo(f"verified  {digest}  {path}")
    click.echo(f"wrote and verified {report.bytes_written} bytes on {device}; "
               "insert the card in the Pi 5 and power it on (see README.txt)")


COMMANDS = [recovery_group]
