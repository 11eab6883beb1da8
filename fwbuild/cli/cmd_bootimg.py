"""Commands: bootimg list / extract / build."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .. import keys as keys_mod
from ..bootimg.bootimg import DEFAULT_KERNEL_NAME, boot_files, build_boot_image, sign_boot_image
from ..bootimg.fat import read_fat
from ..fsutil import atomic_write
from ..sign import source_date_epoch
from ._common import existing_file, writing


@click.group("bootimg")
def bootimg_group() -> None:
    """Build and inspect the HTTP boot image (boot.img, a FAT volume without MBR, + boot.sig)."""


@bootimg_group.command("list")
@click.argument("boot_img", type=existing_file())
def bootimg_list(boot_img: str) -> None:
    """List the files of BOOT_IMG (size, UTC time, path) after a line naming the FAT type."""
    volume = read_fat(Path(boot_img).read_bytes(), boot_img)
    click.echo(volume.describe())
    for entry in volume.entries:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry.mtime))
        size = "<dir>" if entry.is_dir else str(entry.size)
        click.echo(f"{size:>10}  {stamp}  {entry.path}{'/' if entry.is_dir else ''}")


@bootimg_group.command("extract")
@click.argument("boot_img", type=existing_file())
@click.argument("path")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here (default: standard output).")
def bootimg_extract(boot_img: str, path: str, out: Path | None) -> None:
    """Copy the file PATH (e.g. config.txt, overlays/x.dtbo) out of BOOT_IMG."""
    data = read_fat(Path(boot_img).read_bytes(), boot_img).read(path)
    if out is None or str(out) == "-":
        click.get_binary_stream("stdout").write(data)
        return
    with writing("--out", out):
        atomic_write(out, data)
    click.echo(f"wrote {out} ({len(data)} bytes)", err=True)


@bootimg_group.command("build")
@click.option("--kernel", "kernel", type=existing_file(), required=True, help="Kernel Image.")
@click.option("--initramfs", "initramfs", type=existing_file(), required=True,
              help="Initramfs (stored as initramfs_2712).")
@click.option("--dtb", "dtbs", type=existing_file(), multiple=True, required=True,
              help="Device tree blob (repeat for every Pi 5 variant).")
@click.option("--overlay", "overlays", type=existing_file(), multiple=True,
              help="Overlay .dtbo available to dtoverlay= lines (only named ones are shipped).")
@click.option("--cmdline", required=True, help="Kernel command line (cmdline.txt).")
@click.option("--config-line", "config_lines", multiple=True,
              help="Extra config.txt line (repeatable, in order).")
@click.option("--kernel-name", default=DEFAULT_KERNEL_NAME, show_default=True,
              help="File name of the kernel in the image (config.txt gets kernel= otherwise).")
@click.option("--key", "key_path", type=click.Path(path_type=Path), required=True,
              help="Boot-signing RSA-2048 private PEM (its pubkey.bin is in the EEPROM).")
@click.option("--epoch", type=click.IntRange(0, 0xFFFFFFFF), help="Timestamps (default: SOURCE_DATE_EPOCH, else now).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for boot.img and boot.sig.")
def bootimg_build(kernel: str, initramfs: str, dtbs: tuple[str, ...], overlays: tuple[str, ...],
                  cmdline: str, config_lines: tuple[str, ...], kernel_name: str,
                  key_path: Path, epoch: int | None, out_dir: Path) -> None:
    """Build OUT/boot.img and its signature OUT/boot.sig."""
    key = keys_mod.load_boot_key(key_path)
    ts = epoch if epoch is not None else source_date_epoch()
    files = boot_files(
        Path(kernel).read_bytes(), Path(initramfs).read_bytes(),
        {Path(d).name: Path(d).read_bytes() for d in dtbs}, cmdline, list(config_lines),
        {Path(o).name: Path(o).read_bytes() for o in overlays}, kernel_name)
    image = build_boot_image(files, ts)
    signature = sign_boot_image(image, key, ts)
    with writing("--out", out_dir):
        atomic_write(out_dir / "boot.img", image)
        atomic_write(out_dir / "boot.sig", signature)
    click.echo(read_fat(image).describe())
    click.echo(f"wrote {out_dir / 'boot.img'} ({len(image)} bytes) and {out_dir / 'boot.sig'}")


COMMANDS = [bootimg_group]
