"""Commands: initramfs build / list / why."""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import UsageError
from ..initramfs.options import apply_options, option_settings
from ..layout import INITRAMFS, PARTS_SUFFIX, parts_dir, refuse_published
from ..sign import source_date_epoch
from ._common import existing_file, progress_display, writing

F = TypeVar("F", bound=Callable[..., Any])


@click.group("initramfs")
def initramfs_group() -> None:
    """Build and inspect arm64 initramfs archives (cpio newc, zstd/xz/gzip)."""


def _field_options(func: F) -> F:
    """One click option per [initramfs] field that has one (the recipe's field table)."""
    for row in reversed(option_settings()):
        assert row.option is not None
        func = click.option(row.option.flag, row.name, multiple=row.repeatable,
                            metavar=row.option.metavar,
                            type=click.Choice(row.choices) if row.choices else None,
                            help=row.option.help)(func)
    return func


@initramfs_group.command("build")
@click.argument("recipe", required=False, type=existing_file())
@_field_options
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help=f"Output file (default with a recipe: out/<recipe>{PARTS_SUFFIX}/{INITRAMFS.rel}; "
                   "a published set out/<recipe> is changed only by `fwbuild build`).")
def build_cmd(recipe: str | None, out: Path | None, **options: Any) -> None:
    """Build an initramfs from RECIPE's [initramfs] section and/or the options.

    Options add to the recipe's lists (or replace its scalar values). The
    provenance of every path goes to OUT.provenance.json (read by `why`).
    """
    from ..cache import Cache
    from ..initramfs.builder import (
        InitramfsSpec,
        build_initramfs,
        spec_from_recipe,
        write_initramfs,
    )
    from ..recipe import load_recipe

    epoch = source_date_epoch()
    if recipe is not None:
        loaded = load_recipe(Path(recipe))
        epoch = source_date_epoch(loaded.info.source_date_epoch)  # as `fwbuild build` does
        spec = spec_from_recipe(loaded, epoch=epoch)
        out = out or INITRAMFS.path(parts_dir(Path("out"), loaded.name))  # never into out/<recipe>
    else:
        if out is None:
            raise UsageError("--out is required without a recipe")
        spec = InitramfsSpec(epoch=epoch)
    refuse_published(out)  # before the build: a published set is changed only by `fwbuild build`
    spec = apply_options(spec, options)
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
