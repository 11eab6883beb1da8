""".deb extraction in pure Python: ar members, then control.tar / data.tar (xz, zstd, gzip).

Nothing runs as root and nothing outside the destination directory is touched:
member names are normalised (leading `./` and `/` dropped), names with `..`
are rejected, symlinks are *recorded* (never created on the host, so they
cannot be followed there) and those whose target climbs above the package root
are rejected, hard links must name an earlier member, device nodes and fifos
are recorded only. Regular files are written user-writable (0644/0755); their
real permission bits (setuid included) live in the returned member list.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import shutil
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from ..errors import FormatError, FwbuildError

AR_MAGIC = b"!<arch>\n"
# One ar member header: all fields ASCII, space padded.
_AR_HEADER = struct.Struct(
    "16s"  # name (GNU style: ends with "/" or spaces)
    "12s"  # mtime, decimal
    "6s"   # uid, decimal
    "6s"   # gid, decimal
    "8s"   # mode, octal
    "10s"  # size, decimal
    "2s"   # magic "`\n"
)
assert _AR_HEADER.size == 60


@dataclass(frozen=True)
class ArMember:
    name: str
    data: bytes


@dataclass(frozen=True)
class DebMember:
    """One entry of data.tar: kind is f(ile), d(ir), l(ink), h(ard link), c/b (device), p (fifo)."""

    path: str          # normalised, relative: "usr/bin/ssh"
    kind: str
    mode: int          # permission bits (incl. setuid/setgid/sticky)
    target: str = ""   # symlink target as stored, or hard-link source path (normalised)
    size: int = 0


@dataclass(frozen=True)
class DebContents:
    control: dict[str, str]
    members: tuple[DebMember, ...]

    @property
    def package(self) -> str:
        return self.control.get("Package", "?")


def parse_ar(data: bytes, where: str = ".deb") -> list[ArMember]:
    if not data.startswith(AR_MAGIC):
        raise FormatError("not an ar archive (a .deb starts with `!<arch>`)", where)
    members: list[ArMember] = []
    offset = len(AR_MAGIC)
    while offset < len(data):
        if data[offset:offset + 1] == b"\n":  # padding byte of an odd-sized member
            offset += 1
            continue
        raw = data[offset:offset + _AR_HEADER.size]
        if len(raw) < _AR_HEADER.size:
            raise FormatError("truncated ar member header", f"{where} offset {offset}")
        name, _mtime, _uid, _gid, _mode, size_text, fmag = _AR_HEADER.unpack(raw)
        if fmag != b"`\n":
            raise FormatError("bad ar member header magic", f"{where} offset {offset}")
        try:
            size = int(size_text.decode("ascii").strip())
        except ValueError:
            raise FormatError(f"bad ar member size {size_text!r}", f"{where} offset {offset}") from None
        start = offset + _AR_HEADER.size
        body = data[start:start + size]
        if len(body) < size:
            raise FormatError("truncated ar member", f"{where} offset {offset}")
        members.append(ArMember(name.decode("ascii", "replace").rstrip(" ").rstrip("/"), body))
        offset = start + size + (size & 1)
    return members


def _open_tar(member: ArMember, where: str) -> tarfile.TarFile:
    name = member.name
    fileobj: IO[bytes] = io.BytesIO(member.data)
    if name.endswith(".zst"):
        import zstandard

        fileobj = zstandard.ZstdDecompressor().stream_reader(fileobj)
        mode = "r|"
    elif name.endswith(".xz"):
        mode = "r|xz"
    elif name.endswith(".gz"):
        mode = "r|gz"
    elif name.endswith(".bz2"):
        mode = "r|bz2"
    elif name.endswith(".tar"):
        mode = "r|"
    else:
        raise FormatError(f"unsupported .deb member {name}", where,
                          "fwbuild reads data.tar(.xz|.zst|.gz|.bz2)")
    try:
        return tarfile.open(fileobj=fileobj, mode=mode)  # type: ignore[call-overload,no-any-return]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FormatError(f"cannot read {name}: {exc}", where) from None


def _find(members: list[ArMember], prefix: str, where: str) -> ArMember:
    for member in members:
        if member.name.startswith(prefix):
            return member
    raise FormatError(f"no {prefix}* member", where, "is this really a Debian package?")


def normalize_member(name: str, where: str) -> str:
    """`./usr/bin/x` -> `usr/bin/x`; `/etc/x` -> `etc/x`; `..` anywhere is rejected."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise FormatError(f"member {name!r} climbs out of the package with `..`", where,
                          "refusing a package with path traversal")
    return "/".join(parts)


def _check_link(path: str, target: str, where: str) -> None:
    if target.startswith("/"):
        return  # absolute: resolved against the staged tree root, never the host
    depth = path.count("/")  # directories above `path`
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise FormatError(f"symlink /{path} -> {target} points out of the package tree",
                                  where, "refusing a package with links out of its tree")
        elif part not in ("", "."):
            depth += 1


def read_control(data: bytes, where: str = ".deb") -> dict[str, str]:
    """The fields of the package's `control` file (continuation lines joined)."""
    members = parse_ar(data, where)
    with _open_tar(_find(members, "control.tar", where), where) as tar:
        for info in tar:
            if normalize_member(info.name, where) == "control" and info.isfile():
                handle = tar.extractfile(info)
                assert handle is not None
                return parse_control(handle.read().decode("utf-8", "replace"))
    raise FormatError("control.tar has no control file", where)


def parse_control(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
    return fields


def _iter_members(tar: tarfile.TarFile, where: str) -> Iterator[tuple[tarfile.TarInfo, str]]:
    try:
        for info in tar:
            yield info, normalize_member(info.name, where)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FormatError(f"corrupt data.tar: {exc}", where) from None


def extract_deb(data: bytes, dest: Path, where: str = ".deb") -> DebContents:
    """Write the regular files of data.tar under `dest`; return control fields and all members.

    A damaged archive (truncated stream, a file where a directory was, ...) is a FormatError
    naming the package, never a raw decompressor or OS error.
    """
    try:
        return _extract_deb(data, dest, where)
    except FwbuildError:
        raise
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as exc:
        raise FormatError(f"damaged package archive: {type(exc).__name__}: {exc}", where,
                          "delete the cached .deb (FWBUILD_CACHE) and build again") from None
    except Exception as exc:  # zstandard.ZstdError, imported lazily with the zstd member
        if type(exc).__name__ != "ZstdError":
            raise
        raise FormatError(f"damaged package archive: {type(exc).__name__}: {exc}", where,
                          "delete the cached .deb (FWBUILD_CACHE) and build again") from None


def _extract_deb(data: bytes, dest: Path, where: str) -> DebContents:
    members = parse_ar(data, where)
    control = read_control(data, where)
    out: list[DebMember] = []
    known: set[str] = set()
    with _open_tar(_find(members, "data.tar", where), where) as tar:
        for info, path in _iter_members(tar, where):
            mode = info.mode & 0o7777
            if not path:
                continue
            if info.isdir():
                (dest / path).mkdir(parents=True, exist_ok=True)
                out.append(DebMember(path, "d", mode))
            elif info.isreg():
                target_file = dest / path
                target_file.parent.mkdir(parents=True, exist_ok=True)
                handle = tar.extractfile(info)
                assert handle is not None
                with open(target_file, "wb") as fh:
                    shutil.copyfileobj(handle, fh)
                os.chmod(target_file, 0o755 if mode & 0o111 else 0o644)
                out.append(DebMember(path, "f", mode, size=info.size))
            elif info.issym():
                _check_link(path, info.linkname, where)
                out.append(DebMember(path, "l", mode, target=info.linkname))
            elif info.islnk():
                source = normalize_member(info.linkname, where)
                if source not in known:
                    raise FormatError(f"hard link /{path} -> /{source}: no such earlier member", where)
                out.append(DebMember(path, "h", mode, target=source))
            elif info.ischr() or info.isblk():
                out.append(DebMember(path, "c" if info.ischr() else "b", mode,
                                     target=f"{info.devmajor}:{info.devminor}"))
            elif info.isfifo():
                out.append(DebMember(path, "p", mode))
            else:
                raise FormatError(f"unsupported tar member type for /{path}", where)
            known.add(path)
    return DebContents(control, tuple(out))


def stage_deb(deb: Path, dest: Path) -> DebContents:
    """Extract `deb` once into `dest` (`dest/root` + `dest/members.json`), atomically.

    A second call with an existing `dest` reads the stored member list only: the
    cache key (the .deb's sha256) is the caller's business.
    """
    manifest = dest / "members.json"
    if manifest.is_file():
        return load_staged(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        contents = extract_deb(deb.read_bytes(), tmp / "root", str(deb))
        (tmp / "root").mkdir(exist_ok=True)
        doc = {"control": contents.control, "members": [asdict(m) for m in contents.members]}
        (tmp / "members.json").write_text(json.dumps(doc, sort_keys=True))
        try:
            os.replace(tmp, dest)
        except OSError:
            if not manifest.is_file():  # not a concurrent stage of the same package
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_staged(dest)


def load_staged(dest: Path) -> DebContents:
    try:
        doc = json.loads((dest / "members.json").read_text())
        members = tuple(DebMember(**m) for m in doc["members"])
        return DebContents(dict(doc["control"]), members)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"corrupt staged package: {exc}", str(dest),
                          "delete this directory from the cache and build again") from None


