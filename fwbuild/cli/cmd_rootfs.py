"""Commands: rootfs build (the Debian node root the server hands out), rootfs prefetch
(record and publish its boot working set)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import click

from ..errors import BuildError
from ..layout import refuse_published
from ..sign import source_date_epoch
from ._common import emit_json, json_option, progress_display, writing


@click.group("rootfs")
def rootfs_group() -> None:
    """Build node root filesystems (what a distant node boots through the VPN)."""


@rootfs_group.command("build")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the image here (e.g. the server's image directory).")
@click.option("--package", "packages", multiple=True,
              help="Extra Debian arm64 package besides the default set (repeatable).")
@click.option("--hostname", default="fwbuild-node", show_default=True)
@click.option("--offline", is_flag=True, help="Use only the cache (no network).")
@json_option
def build_cmd(out: Path | None, packages: tuple[str, ...], hostname: str, offline: bool,
              as_json: bool) -> None:
    """Build a Debian bookworm arm64 root (minbase + systemd + openssh-server) as ext4.

    The image is cached by the digest of its inputs (pinned packages, settings);
    timestamps come from SOURCE_DATE_EPOCH (default 0), so a rebuild is byte-identical.
    Needs root (files keep their owners).
    """
    from ..cache import Cache
    from ..rootfs.debian import DEFAULT_PACKAGES, DebianRootSpec, build_debian_root

    spec = DebianRootSpec(packages=tuple(dict.fromkeys((*DEFAULT_PACKAGES, *packages))),
                          hostname=hostname, epoch=source_date_epoch(0))
    with progress_display("rootfs build") as display:
        root = build_debian_root(Cache.default(), spec, progress=display, offline=offline)
    image = root.image
    if out is not None:
        with writing("--out", out):
            _publish(root.image, out)
        image = out
    if as_json:
        emit_json({**root.describe(), "image": str(image)})
    else:
        click.echo(f"root image: {image}")
        click.echo(f"sha256: {root.sha256}  size: {image.stat().st_size}  packages: {len(root.packages)}")


@rootfs_group.command("prefetch")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--initramfs", "initrd", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The VPN initramfs the reference boot uses (the initramfs of "
                   "`fwbuild build recipes/virtual.toml`).")
@click.option("--kernel-package", default="linux-image-cloud-arm64", show_default=True,
              help="Debian arm64 kernel package the virtual node boots.")
@click.option("--marker", default=None,
              help="Console text that ends the boot (default: the Debian root's "
                   "multi-user.target marker).")
@click.option("--init-line", default=None,
              help="Console text of the root's first line (default: systemd's).")
@click.option("--offline", is_flag=True, help="Use only the cache (no network).")
@json_option
def prefetch_cmd(image: Path, initrd: Path, kernel_package: str, marker: str | None,
                 init_line: str | None, offline: bool, as_json: bool) -> None:
    """Record IMAGE's boot working set and publish it as IMAGE.prefetch.

    A reference boot of the virtual node (QEMU, LAN path, no set) mounts IMAGE through
    the VPN in image mode, as a distant node does, up to the marker; the blocks it read
    become the set, keyed by IMAGE's sha256 (a changed image drops it). Nodes booting
    IMAGE then fetch those blocks before mounting it. Run it again after every change of
    the image (publishing a set for another image removes it). Needs root and
    qemu-system-aarch64.
    """
    from ..cache import Cache
    from ..initramfs.builder import stage_kernel
    from ..rootfs.debian import MARKER, ROOT_INIT_LINE
    from ..virtual.refboot import record_working_set
    from ..virtual.workingset import BLOCK, publish_working_set

    with progress_display("rootfs prefetch") as display:
        kernel = stage_kernel(kernel_package, Cache.default(), progress=display, offline=offline).image
    work = Path(tempfile.mkdtemp(prefix="fwbuild-refboot-"))
    ws, run = record_working_set(work, image.resolve(), kernel, initrd,
                                 marker=marker or MARKER, init_line=init_line or ROOT_INIT_LINE)
    with writing("IMAGE", image):
        published = publish_working_set(ws, image)
    shutil.rmtree(work, ignore_errors=True)
    if published is None:
        raise BuildError("IMAGE changed during the reference boot: no set published",
                           str(image), "run the command again")
    info = {"image": str(image), "set": str(published), "image_sha256": ws.image_sha256,
            "ranges": len(ws.ranges), "bytes": ws.blocks * BLOCK,
            "reference_boot_s": round(run.to_marker_s, 1), "sftp_requests": run.sftp.total_requests}
    if as_json:
        emit_json(info)
    else:
        click.echo(f"working set: {published}")
        click.echo(f"{len(ws.ranges)} ranges, {ws.blocks * BLOCK} bytes of {ws.image_size} "
                   f"(reference boot {run.to_marker_s:.1f} s, {run.sftp.total_requests} SFTP requests)")


def _publish(image: Path, out: Path) -> None:
    """`out` becomes the image (a hard link where it can), replaced in one step."""
    refuse_published(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(image, tmp)
    except OSError:
        shutil.copyfile(image, tmp)
    os.replace(tmp, out)


COMMANDS = [rootfs_group]
