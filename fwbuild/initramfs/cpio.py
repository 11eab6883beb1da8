"""cpio "newc" (SVR4, no CRC) archives: the format Linux unpacks as an initramfs.

A pure module: bytes in, bytes out, no file I/O. One frozen `CpioEntry` per
member; `pack_entry`/`parse_entry` are the matched header pair; `write_cpio` and
`read_cpio` handle whole archives (with the `TRAILER!!!` member);
`make_reproducible` is the named reproducibility step (sorted, parents first,
uid/gid 0, clamped mtimes, renumbered inodes); `compress`/`decompress` wrap
zstd (default), xz and gzip with fixed parameters so equal inputs give equal bytes.

Hard links share an inode number; the file data travels with the first member of
the group and later members carry size 0 (the layout u-root writes; the kernel
and GNU cpio both accept it).
"""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ..errors import FormatError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"

# The header is ASCII: a 6-byte magic then 13 fields of 8 hexadecimal digits.
# The field order of the newc format (see the kernel's init/initramfs.c, u-root
# pkg/cpio/newc.go):
_FIELDS = (
    "ino",        # inode number: equal numbers mark hard links
    "mode",       # st_mode: file type bits and permissions
    "uid",        # owner user id
    "gid",        # owner group id
    "nlink",      # number of links
    "mtime",      # modification time, seconds since the epoch
    "filesize",   # size of the data that follows the name
    "devmajor",   # device holding the file (unused by the kernel)
    "devminor",
    "rdevmajor",  # for character/block devices: the device number
    "rdevminor",
    "namesize",   # length of the name, including its NUL terminator
    "check",      # checksum: always 0 in newc (070702 "crc" format is not used)
)
_FIELD_LEN = 8
HEADER_SIZE = len(MAGIC) + _FIELD_LEN * len(_FIELDS)
assert HEADER_SIZE == 110
_MAX_FIELD = 0xFFFFFFFF

COMPRESSIONS = ("zstd", "xz", "gzip", "none")
# Level 19: well inside the kernel's zstd window limit (8 MiB window), and the
# frame carries the content size, so the bytes depend on the input only.
ZSTD_LEVEL = 19
ZSTD_JOB_SIZE = 2 << 20
GZIP_LEVEL = 9
# xz as the kernel's initramfs decompressor takes it: LZMA2 only (no BCJ filter),
# CRC32 check. lc=1/lp=2/pb=2 suit 4-byte aarch64 instructions (about 1 % smaller
# than the preset); single-threaded liblzma, so the bytes depend on the input only.
XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
               "lc": 1, "lp": 2, "pb": 2, "nice_len": 273}]
XZ_LEVEL = "9e-lc1lp2pb2"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. `name` is relative ("bin/sh", never "/bin/sh").

    `data` is the file content for regular files and the link target for
    symbolic links; empty for everything else.
    """

    name: str
    mode: int
    data: bytes = b""
    mtime: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    ino: int = 0
    devmajor: int = 0
    devminor: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0

    @property
    def kind(self) -> str:
        """One letter like `ls -l`: d, -, l, c, b, p, s."""
        return stat.filemode(self.mode)[0]

    @property
    def link_target(self) -> str:
        return self.data.decode("utf-8", "surrogateescape") if stat.S_ISLNK(self.mode) else ""


def _pad4(length: int) -> int:
    return (4 - length % 4) % 4


def pack_entry(entry: CpioEntry) -> bytes:
    """Header + name + padding + data + padding for one member."""
    name = entry.name.encode("utf-8", "surrogateescape") + b"\0"
    values = {
        "ino": entry.ino, "mode": entry.mode, "uid": entry.uid, "gid": entry.gid,
        "nlink": entry.nlink, "mtime": entry.mtime, "filesize": len(entry.data),
        "devmajor": entry.devmajor, "devminor": entry.devminor,
        "rdevmajor": entry.rdevmajor, "rdevminor": entry.rdevminor,
        "namesize": len(name), "check": 0,
    }
    header = bytearray(MAGIC)
    for field in _FIELDS:
        value = values[field]
        if not 0 <= value <= _MAX_FIELD:
            raise FormatError(f"cpio field {field}={value} does not fit in 32 bits", entry.name)
        header += b"%08X" % value
    out = bytes(header) + name + b"\0" * _pad4(HEADER_SIZE + len(name))
    return out + entry.data + b"\0" * _pad4(len(entry.data))


_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def parse_entry(data: bytes, offset: int) -> tuple[CpioEntry, int]:
    """Parse the member at `offset`; return it and the offset of the next member."""
    where = f"cpio offset {offset}"
    header = data[offset:offset + HEADER_SIZE]
    if len(header) < HEADER_SIZE:
        raise FormatError("truncated cpio header", where, "the archive is cut short")
    if header[:6] != MAGIC:
        hint = "only the newc format (070701) is supported" if header[:5] == b"07070" else None
        raise FormatError(f"bad cpio magic {header[:6]!r}", where, hint)
    values: dict[str, int] = {}
    for index, field in enumerate(_FIELDS):
        start = 6 + index * _FIELD_LEN
        text = header[start:start + _FIELD_LEN]
        # Exactly 8 hex digits: int(x, 16) would also take "-0000001", "+fff", " 0x1f" or "1_00".
        if len(text) != _FIELD_LEN or not all(c in _HEX_DIGITS for c in text):
            raise FormatError(f"cpio field {field} is not hexadecimal (8 digits): {text!r}", where)
        values[field] = int(text, 16)
    pos = offset + HEADER_SIZE
    name_end = pos + values["namesize"]
    raw_name = data[pos:name_end]
    if values["namesize"] == 0 or len(raw_name) < values["namesize"] or raw_name[-1:] != b"\0":
        raise FormatError("bad or truncated cpio member name", where)
    pos = name_end + _pad4(HEADER_SIZE + values["namesize"])
    body = data[pos:pos + values["filesize"]]
    if len(body) < values["filesize"]:
        raise FormatError("truncated cpio member data", where)
    pos += values["filesize"] + _pad4(values["filesize"])
    entry = CpioEntry(
        name=raw_name[:-1].decode("utf-8", "surrogateescape"), mode=values["mode"], data=body,
        mtime=values["mtime"], uid=values["uid"], gid=values["gid"], nlink=values["nlink"],
        ino=values["ino"], devmajor=values["devmajor"], devminor=values["devminor"],
        rdevmajor=values["rdevmajor"], rdevminor=values["rdevminor"],
    )
    return entry, pos


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """The members verbatim, in the given order, then the trailer."""
    parts = [pack_entry(entry) for entry in entries]
    parts.append(pack_entry(CpioEntry(name=TRAILER, mode=0, nlink=1)))
    return b"".join(parts)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """All members up to the trailer (which is not returned).

    Trailing zero padding after the trailer is accepted; several concatenated
    archives are not (the kernel accepts them, but fwbuild never writes them).
    """
    entries: list[CpioEntry] = []
    offset = 0
    while True:
        entry, offset = parse_entry(data, offset)
        if entry.name == TRAILER:
            return entries
        entries.append(entry)


def path_key(name: str) -> tuple[str, ...]:
    """Sort key that puts every directory right before its children."""
    return tuple(part for part in name.split("/") if part)


def make_reproducible(entries: Sequence[CpioEntry], epoch: int) -> list[CpioEntry]:
    """Sorted (parents first), uid/gid 0, mtimes clamped to `epoch`, inodes renumbered.

    Regular files sharing a non-zero `ino` form a hard-link group: the new inode
    is shared, `nlink` is the group size and the data stays with the first
    member in sorted order.
    """
    ordered = sorted(entries, key=lambda e: path_key(e.name))
    seen: set[tuple[str, ...]] = set()
    for entry in ordered:
        key = path_key(entry.name)
        if not key:
            raise FormatError("cpio member with an empty name", hint="use paths like `bin/sh`")
        if key in seen:
            raise FormatError("duplicate cpio member", entry.name)
        seen.add(key)
    groups: dict[int, list[int]] = {}
    for index, entry in enumerate(ordered):
        if entry.ino and stat.S_ISREG(entry.mode):
            groups.setdefault(entry.ino, []).append(index)
    out: list[CpioEntry] = []
    new_ino: dict[int, int] = {}
    next_ino = 1
    for index, entry in enumerate(ordered):
        group = groups.get(entry.ino) if entry.ino and stat.S_ISREG(entry.mode) else None
        data = entry.data
        if group is not None and len(group) > 1:
            if entry.ino not in new_ino:
                new_ino[entry.ino] = next_ino
                next_ino += 1
                data = next((ordered[i].data for i in group if ordered[i].data), b"")
            else:
                data = b""
            ino, nlink = new_ino[entry.ino], len(group)
        else:
            ino, nlink = next_ino, 2 if stat.S_ISDIR(entry.mode) else 1
            next_ino += 1
        out.append(replace(
            entry, name="/".join(path_key(entry.name)), data=data, ino=ino, nlink=nlink,
            uid=0, gid=0, mtime=min(entry.mtime, epoch), devmajor=0, devminor=0,
        ))
    return out


def compress(data: bytes, method: str = "zstd") -> bytes:
    """Compress with fixed parameters: equal input gives equal output."""
    if method == "zstd":
        import zstandard

        # Multi-threaded mode with a fixed job size: zstd's output then depends on
        # the job size, never on the number of workers (tested), so every host
        # gets the same bytes while using all its cores.
        params = zstandard.ZstdCompressionParameters.from_level(
            ZSTD_LEVEL, threads=max(1, os.cpu_count() or 1), job_size=ZSTD_JOB_SIZE,
            write_checksum=True, write_content_size=True)
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    if method == "gzip":
        return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
    if method == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=XZ_FILTERS)
    if method == "none":
        return data
    raise FormatError(f"unknown compression {method!r}", hint=f"use one of {', '.join(COMPRESSIONS)}")


def detect_compression(data: bytes, where: str | None = None) -> str:
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if data[:6] == MAGIC:
        return "none"
    raise FormatError("not a newc cpio archive, nor a zstd, xz or gzip one", where,
                      hint="initramfs files are cpio newc, optionally zstd-, xz- or gzip-compressed")


def decompress(data: bytes, where: str | None = None) -> bytes:
    """Undo `compress`, detecting the method from the magic bytes."""
    import zstandard

    method = detect_compression(data, where)
    try:
        if method == "zstd":
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        if method == "gzip":
            return gzip.decompress(data)
        if method == "xz":
            return lzma.decompress(data, format=lzma.FORMAT_XZ)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as exc:
        raise FormatError(f"corrupt {method} stream: {exc}", where) from None
    return data
