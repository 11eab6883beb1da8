"""Commands: initramfs build / list / why."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import click

from ..errors import UsageError
from ..sign import source_date_epoch
from ._common import existing_file, progress_display, writing


@click.group("initramfs")
def initramfs_group() -> None:
    """Build and inspect arm64 initramfs archives (cpio newc, zstd/xz/gzip)."""


@initramfs_group.command("build")
@click.argument("recipe", required=False, type=existing_file())
@click.option("--package", "packages", multiple=True, help="Debian arm64 package (repeatable).")
@click.option("--binary", "binaries", multiple=True,
              help="Path from the packages to include with its ELF closure (repeatable).")
@click.option("--module", "modules", multiple=True, help="Kernel module name (repeatable).")
@click.option("--kernel-package", help="linux-image-* package the modules come from.")
@click.option("--file", "files", multiple=True, metavar="DEST=HOSTPATH", help="Extra file (repeatable).")
@click.option("--init", help="Init template: builtin:NAME or a path to a jinja2 template.")
@click.option("--compression", type=click.Choice(("zstd", "xz", "gzip", "none")), help="Default: zstd.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default with a recipe: out/<recipe>/initramfs/initramfs_2712).")
def build_cmd(recipe: str | None, packages: tuple[str, ...], binaries: tuple[str, ...],
              modules: tuple[str, ...], kernel_package: str | None, files: tuple[str, ...],
              init: str | None, compression: str | None, out: Path | None) -> None:
    """Build an initramfs from RECIPE's [initramfs] section and/or the options.

    Options add to the recipe's lists (or replace its scalar values). The
    provenance of every path goes to OUT.provenance.json (read by `why`).
    """
    from ..initramfs.builder import (
        InitramfsSpec,
        build_initramfs,
        spec_from_recipe,
        write_initramfs,
    )
    from ..recipe import load_recipe
    from ..sources import Cache

    epoch = source_date_epoch()
    if recipe is not None:
        loaded = load_recipe(Path(recipe))
        epoch = source_date_epoch(loaded.info.source_date_epoch)  # as `fwbuild build` does
        spec = spec_from_recipe(loaded, epoch=epoch)
        out = out or Path("out") / loaded.name / "initramfs" / "initramfs_2712"
    else:
        if out is None:
            raise UsageError("--out is required without a recipe")
        spec = InitramfsSpec(epoch=epoch)
    extra: dict[str, str] = {}
    for item in files:
        dest, sep, host = item.partition("=")
        if not sep or not dest or not host:
            raise UsageError(f"bad --file {item!r}", hint="use --file /etc/motd=./motd")
        extra[dest] = host
    from dataclasses import replace

    spec = replace(
        spec,
        packages=tuple(dict.fromkeys((*spec.packages, *packages))),
        paths=tuple(dict.fromkeys((*spec.paths, *binaries))),
        modules=tuple(dict.fromkeys((*spec.modules, *modules))),
        kernel_package=kernel_package or spec.kernel_package,
        files={**spec.files, **extra},
        init=init or spec.init,
        compression=compression or spec.compression,
    )
    started = time.monotonic()
    with progress_display("initramfs") as display:
        result = build_initramfs(spec, Cache.default(), progress=display)
    with writing("--out", out):
        sidecar = write_initramfs(result, out)
    click.echo(f"{out}: {len(result.data)} bytes ({spec.compression}), "
               f"{result.uncompressed_size} uncompressed, {len(result.entries)} entries, "
               f"{len(result.packages)} packages pinned, {time.monotonic() - started:.1f} s")
    if result.builtin_modules:
        click.echo(f"built into the kernel (not copied): {', '.join(result.builtin_modules)}")
    click.echo(f"provenance: {sidecar}")


@initramfs_group.command("list")
@click.argument("file", type=existing_file())
@click.option("--numeric/--names", default=True, help="Print uid/gid numbers (all 0 anyway).")
def list_cmd(file: str, numeric: bool) -> None:
    """List FILE like `cpio -tv` (with sizes); zstd, xz, gzip or uncompressed."""
    from ..initramfs.cpio import decompress, detect_compression, read_cpio

    data = Path(file).read_bytes()
    method = detect_compression(data, file)
    entries = read_cpio(decompress(data, file))
    total = 0
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(entry.mtime))
        size = len(entry.data)
        if entry.kind in "cb":
            size_text = f"{entry.rdevmajor:>4},{entry.rdevminor:>4}"
        else:
            size_text = f"{size:>9}"
        owner = f"{entry.uid:<4} {entry.gid:<4}" if numeric else "root root"
        line = f"{stat.filemode(entry.mode)} {entry.nlink:>3} {owner} {size_text} {when} /{entry.name}"
        if entry.kind == "l":
            line += f" -> {entry.link_target}"
        click.echo(line)
        total += size if entry.kind == "-" else 0
    click.echo(f"{len(entries)} entries, {total} bytes of file data, {len(data)} bytes ({method})",
               err=True)


@initramfs_group.command("why")
@click.argument("file", type=existing_file())
@click.argument("path")
def why_cmd(file: str, path: str) -> None:
    """Say which package and dependency chain pulled PATH into FILE (reads FILE.provenance.json)."""
    from ..initramfs.builder import why

    chain = why(Path(file), path)
    click.echo(f"/{path.strip('/')}")
    for depth, reason in enumerate(chain):
        click.echo(f"{'  ' * (depth + 1)}<- {reason}")


COMMANDS = [initramfs_group]
