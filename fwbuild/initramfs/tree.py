"""The initramfs tree: one "destination -> source" map.

Every path of the archive is added once with its source (bytes, a host file, a
symlink target, a directory, a device node or a hard link to another path) and
its provenance (the chain of reasons that pulled it in, for `fwbuild initramfs
why`). Adding the same path again with an equal source is a no-op; with a
different source it is a `BuildError` naming both. Parents are filled in as
directories; output is sorted with parents first. Host files are read only when
the tree is turned into cpio entries.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError
from .cpio import CpioEntry, make_reproducible, path_key


@dataclass(frozen=True)
class Bytes:
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class HostFile:
    path: Path
    mode: int | None = None  # None: keep the host file's permission bits


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755


@dataclass(frozen=True)
class Device:
    kind: str  # "c" or "b"
    major: int
    minor: int
    mode: int = 0o600


@dataclass(frozen=True)
class HardLink:
    to: str  # another destination path of the same tree (a regular file)


Source = Bytes | HostFile | Symlink | Dir | Device | HardLink
Provenance = tuple[str, ...]


def normalize_dest(dest: str) -> str:
    """`/usr//bin/./ssh` -> `usr/bin/ssh`; rejects `..` and empty paths."""
    parts = [part for part in dest.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise BuildError(f"bad initramfs path {dest!r}",
                         hint="use an absolute path inside the archive, without `..`")
    return "/".join(parts)


def describe(source: Source) -> str:
    if isinstance(source, Bytes):
        return f"{len(source.data)} bytes (mode {source.mode:o})"
    if isinstance(source, HostFile):
        return f"host file {source.path}"
    if isinstance(source, Symlink):
        return f"symlink -> {source.target}"
    if isinstance(source, Dir):
        return "directory"
    if isinstance(source, Device):
        return f"device {source.kind} {source.major} {source.minor}"
    return f"hard link to /{source.to}"


class Tree:
    """Mutable builder of the destination map (the only mutable piece of the build)."""

    def __init__(self) -> None:
        self._sources: dict[str, Source] = {}
        self._provenance: dict[str, Provenance] = {}

    def add(self, dest: str, source: Source, provenance: Provenance = ()) -> str:
        path = normalize_dest(dest)
        if isinstance(source, HardLink):
            source = HardLink(normalize_dest(source.to))
        old = self._sources.get(path)
        if old is not None:
            if old == source or (isinstance(old, Dir) and isinstance(source, Dir)):
                return path
            raise BuildError(
                f"two different sources for /{path}: {describe(old)} "
                f"(from {' <- '.join(self._provenance[path]) or '?'}) and {describe(source)} "
                f"(from {' <- '.join(provenance) or '?'})",
                hint="drop one of them from the recipe, or give them different destinations")
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            existing = self._sources.get(parent)
            if existing is None:
                self._sources[parent] = Dir()
                self._provenance[parent] = (f"parent of /{path}", *provenance)
            elif not isinstance(existing, Dir):
                raise BuildError(f"/{parent} is a {describe(existing)}, so /{path} cannot go below it",
                                 hint="add the file under the real directory the link points to")
        self._sources[path] = source
        self._provenance[path] = provenance
        return path

    def __contains__(self, dest: str) -> bool:
        return normalize_dest(dest) in self._sources

    def get(self, dest: str) -> Source | None:
        return self._sources.get(normalize_dest(dest))

    def paths(self) -> list[str]:
        return sorted(self._sources, key=path_key)

    def provenance(self) -> dict[str, list[str]]:
        """`{"/usr/bin/ssh": ["package openssh-client", ...], ...}` in path order."""
        return {f"/{p}": list(self._provenance[p]) for p in self.paths()}

    def to_entries(self, epoch: int) -> list[CpioEntry]:
        """Read host files and return reproducible cpio entries (see `make_reproducible`)."""
        entries: list[CpioEntry] = []
        inode_of: dict[str, int] = {}
        for index, path in enumerate(self.paths(), start=1):
            inode_of[path] = index
        for path in self.paths():
            entries.append(self._entry(path, inode_of, epoch))
        return make_reproducible(entries, epoch)

    def _entry(self, path: str, inode_of: dict[str, int], epoch: int) -> CpioEntry:
        source = self._sources[path]
        if isinstance(source, Bytes):
            return CpioEntry(path, stat.S_IFREG | source.mode, source.data, mtime=epoch,
                             ino=inode_of[path])
        if isinstance(source, HostFile):
            try:
                info = os.stat(source.path)
                data = source.path.read_bytes()
            except OSError as exc:
                raise BuildError(f"cannot read {source.path}: {exc.strerror}", f"/{path}") from None
            if not stat.S_ISREG(info.st_mode):
                raise BuildError(f"{source.path} is not a regular file", f"/{path}")
            # Host modes and times depend on umask and on when the cache was filled:
            # normalise them (0755 when any execute bit is set, else 0644; mtime = epoch).
            host_mode = 0o755 if info.st_mode & 0o111 else 0o644
            mode = host_mode if source.mode is None else source.mode
            return CpioEntry(path, stat.S_IFREG | mode, data, mtime=epoch, ino=inode_of[path])
        if isinstance(source, Symlink):
            return CpioEntry(path, stat.S_IFLNK | 0o777, source.target.encode(), mtime=epoch)
        if isinstance(source, Dir):
            return CpioEntry(path, stat.S_IFDIR | source.mode, mtime=epoch)
        if isinstance(source, Device):
            kind = stat.S_IFCHR if source.kind == "c" else stat.S_IFBLK
            return CpioEntry(path, kind | source.mode, mtime=epoch,
                             rdevmajor=source.major, rdevminor=source.minor)
        target = source.to
        if not isinstance(self._sources.get(target), (Bytes, HostFile)):
            raise BuildError(f"hard link /{path} points to /{target}, which is not a regular file")
        base = self._entry(target, inode_of, epoch)
        return CpioEntry(path, base.mode, base.data, mtime=base.mtime, ino=inode_of[target])
