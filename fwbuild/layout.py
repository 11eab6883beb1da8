"""The layout of `out/`: where every file of a published artifact set lives.

This module is the one place that spells the paths of a set; the build steps,
`fwbuild verify`, the server, the recovery kit and the virtual site all take them
from here. A published set, `out/<recipe>/` (a symlink):

  manifest.json                               every artifact's sha256 and size (written last)
  eeprom/<variant>/pieeprom.bin               EEPROM image per variant (recovery, permissive, enforced)
  eeprom/<variant>/pieeprom.sig               its signature file (sha256, ts:, target-soc)
  initramfs/initramfs_2712                    the node's initramfs
  initramfs/initramfs_2712.provenance.json    why each of its paths is there (`fwbuild initramfs why`)
  bootimg/boot.img, bootimg/boot.sig          the HTTP boot image and its signature
  recovery/rpi-5-sd-recovery.tar.gz           the SD recovery kit (recovery variant)

The link points into `out/.builds/<recipe>/<digest>/`; only the build's publish step
creates those directories and nothing ever writes into a published one
(`refuse_published`, called by `fsutil.atomic_write`). Single-artifact commands
(`fwbuild initramfs build RECIPE`) write under `out/<recipe>.parts/` instead, which no
recipe name can collide with (names have no `.`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UsageError

MANIFEST = "manifest.json"
BUILDS_DIR = ".builds"
STAGING_PREFIX = ".tmp-"
PARTS_SUFFIX = ".parts"


@dataclass(frozen=True, order=True)
class Artifact:
    """One file of a published set: its `kind` (what a step declares) and its path in the set."""

    kind: str
    rel: str

    def path(self, root: Path) -> Path:
        return root.joinpath(*PurePosixPath(self.rel).parts)

    def __str__(self) -> str:
        return self.rel


@dataclass(frozen=True)
class Family:
    """A kind of artifact with one file per EEPROM variant: `pattern` holds `{variant}`."""

    kind: str
    pattern: str

    def __call__(self, variant: str) -> Artifact:
        return Artifact(self.kind, self.pattern.format(variant=variant))

    def variant_of(self, rel: str) -> str | None:
        """The variant when `rel` is one of this family's paths, else None."""
        head, _, tail = self.pattern.partition("{variant}")
        if rel.startswith(head) and rel.endswith(tail) and len(rel) > len(head) + len(tail):
            variant = rel[len(head):len(rel) - len(tail)]
            return variant if "/" not in variant else None
        return None


Handle = Artifact | Family


def kind_of(handle: Handle) -> str:
    return handle.kind


EEPROM_DIR = "eeprom"
EEPROM_IMAGE = Family("eeprom.image", EEPROM_DIR + "/{variant}/pieeprom.bin")
EEPROM_SIG = Family("eeprom.sig", EEPROM_DIR + "/{variant}/pieeprom.sig")
INITRAMFS = Artifact("initramfs", "initramfs/initramfs_2712")
INITRAMFS_PROVENANCE = Artifact("initramfs.provenance", INITRAMFS.rel + ".provenance.json")
BOOT_IMG = Artifact("bootimg.image", "bootimg/boot.img")
BOOT_SIG = Artifact("bootimg.sig", "bootimg/boot.sig")
RECOVERY_KIT = Artifact("recovery.kit", "recovery/rpi-5-sd-recovery.tar.gz")


def set_dir(out_root: Path, recipe: str) -> Path:
    """The published set of `recipe` (the symlink the publish step swaps)."""
    return out_root / recipe


def builds_dir(out_root: Path, recipe: str) -> Path:
    """Where the builds of `recipe` live (staging `.tmp-<pid>-*` and published `<digest>`)."""
    return out_root / BUILDS_DIR / recipe


def parts_dir(out_root: Path, recipe: str) -> Path:
    """Where single-artifact commands put their output for `recipe` (never a published set)."""
    return out_root / f"{recipe}{PARTS_SUFFIX}"


def published_set_of(path: Path) -> Path | None:
    """The published set directory (`.builds/<recipe>/<digest>`) that `path` resolves into,
    or None. A staging directory (`.tmp-*`) is not published."""
    try:
        resolved = Path(os.path.realpath(path))
    except (OSError, ValueError):
        return None
    for parent in (resolved, *resolved.parents):
        if (parent.parent.parent.name == BUILDS_DIR and not parent.name.startswith(STAGING_PREFIX)
                and (parent / MANIFEST).is_file()):
            return parent
    return None


def refuse_published(path: Path) -> None:
    """Raise when writing `path` would change a published set (through `out/<recipe>` or not)."""
    target = published_set_of(path)
    if target is not None:
        raise UsageError("refusing to write into a published artifact set", str(path),
                         f"it resolves into {target}, which its manifest.json describes; only "
                         "`fwbuild build` replaces a set: write elsewhere (e.g. out/<recipe>.parts/)")
