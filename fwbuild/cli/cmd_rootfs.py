"""Commands: rootfs build (the Debian node root the server hands out)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

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
