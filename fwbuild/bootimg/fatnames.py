"""FAT directory names: 8.3 short names, VFAT long names (LFN), DOS timestamps.

Pure helpers for `fat.py`. A name is stored as a plain 8.3 entry when it can be
(upper- or lower-case base and extension: the lower-case ones use the NT case
flags that Linux, mtools and Windows honour); only other names get VFAT long-name
entries plus a generated `BASIS~N` short alias.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable

from ..errors import FormatError

# Characters allowed in an 8.3 name besides A-Z and 0-9 (FAT spec, "short name" rules).
_SHORT_SPECIAL = "!#$%&'()-@^_`{}~"
_SHORT_CHARS = re.compile(r"^[A-Z0-9" + re.escape(_SHORT_SPECIAL) + r"]+$")
# Characters a long name cannot hold (plus control characters).
_LONG_FORBIDDEN = set('\\/:*?"<>|')
LFN_CHARS_PER_ENTRY = 13
LFN_MAX_UNITS = 255

CASE_LOWER_BASE = 0x08  # NT reserved byte: the base name is shown in lower case
CASE_LOWER_EXT = 0x10  # NT reserved byte: the extension is shown in lower case

DOS_EPOCH = 315532800  # 1980-01-01T00:00:00Z, the earliest DOS date
DOS_LAST = 4354819198  # 2107-12-31T23:59:58Z, the latest DOS date


def validate_long_name(name: str, where: str) -> None:
    """Raise FormatError unless `name` is a valid FAT (VFAT) file name component."""
    if name in ("", ".", ".."):
        raise FormatError(f"invalid file name {name!r}", where, "use a plain file name")
    bad = sorted({c for c in name if c in _LONG_FORBIDDEN or ord(c) < 0x20 or ord(c) == 0x7F})
    if bad:
        raise FormatError(f"file name {name!r} holds characters FAT forbids: {''.join(bad)!r}",
                          where, 'avoid \\ / : * ? " < > | and control characters')
    if name.endswith((".", " ")) or name.startswith(" "):
        raise FormatError(f"file name {name!r} starts with a space or ends with a dot or space",
                          where, "FAT implementations strip them; rename the file")
    if len(name.encode("utf-16-le")) // 2 > LFN_MAX_UNITS:
        raise FormatError(f"file name is longer than {LFN_MAX_UNITS} characters", where)


def _split(name: str) -> tuple[str, str]:
    base, dot, ext = name.rpartition(".")
    return (base, ext) if dot else (name, "")


def exact_short_name(name: str) -> tuple[bytes, int] | None:
    """The (11-byte 8.3 name, NT case flags) storing `name` exactly, or None when an LFN is needed."""
    if name.startswith("."):
        return None
    base, ext = _split(name)
    if not 1 <= len(base) <= 8 or len(ext) > 3 or (ext == "" and name.endswith(".")):
        return None
    flags = 0
    for part, flag in ((base, CASE_LOWER_BASE), (ext, CASE_LOWER_EXT)):
        if part == "":
            continue
        if part.islower():
            flags |= flag
        elif part.upper() != part:
            return None  # mixed case needs a long name
        if not _SHORT_CHARS.match(part.upper()):
            return None
    return (base.upper().ljust(8) + ext.upper().ljust(3)).encode("ascii"), flags


def _basis(name: str) -> tuple[str, str]:
    """The Windows-style basis for a short alias: upper case, invalid characters as `_`."""
    cleaned = name.upper().replace(" ", "").lstrip(".")
    base, ext = _split(cleaned)

    def fix(part: str) -> str:
        return "".join(c if c.isascii() and _SHORT_CHARS.match(c) else "_" for c in part)

    return fix(base.replace(".", ""))[:8] or "_", fix(ext)[:3]


def alias_short_name(name: str, taken: set[bytes]) -> bytes:
    """A unique `BASIS~N.EXT` alias for a long name; adds it to `taken`."""
    base, ext = _basis(name)
    for number in range(1, 1_000_000):
        tail = f"~{number}"
        candidate = (base[: 8 - len(tail)] + tail).ljust(8) + ext.ljust(3)
        raw = candidate.encode("ascii")
        if raw not in taken:
            taken.add(raw)
            return raw
    raise FormatError(f"no free short alias for {name!r}")  # pragma: no cover - 10^6 names


def short_checksum(short: bytes) -> int:
    """The LFN checksum of an 11-byte short name (FAT spec `ChkSum`)."""
    total = 0
    for byte in short:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def lfn_chunks(name: str) -> list[bytes]:
    """The name as UTF-16LE 26-byte chunks, NUL-terminated then 0xFFFF-padded (first chunk first)."""
    units = name.encode("utf-16-le")
    if len(units) % (2 * LFN_CHARS_PER_ENTRY):
        units += b"\x00\x00"
    while len(units) % (2 * LFN_CHARS_PER_ENTRY):
        units += b"\xff\xff"
    size = 2 * LFN_CHARS_PER_ENTRY
    return [units[i: i + size] for i in range(0, len(units), size)]


def lfn_decode(chunks: Iterable[bytes]) -> str:
    """The long name stored in 26-byte chunks (first chunk first), cut at the NUL."""
    units = b"".join(chunks)
    for i in range(0, len(units), 2):
        if units[i: i + 2] == b"\x00\x00":
            units = units[:i]
            break
    return units.decode("utf-16-le", errors="replace")


def short_display(short: bytes, flags: int) -> str:
    """The name an 8.3 entry shows, honouring the NT lower-case flags."""
    raw = bytearray(short)
    if raw[0] == 0x05:
        raw[0] = 0xE5
    base = raw[:8].decode("latin-1").rstrip(" ")
    ext = raw[8:].decode("latin-1").rstrip(" ")
    if flags & CASE_LOWER_BASE:
        base = base.lower()
    if flags & CASE_LOWER_EXT:
        ext = ext.lower()
    return f"{base}.{ext}" if ext else base


def dos_datetime(epoch: int) -> tuple[int, int]:
    """(date, time) DOS fields for unix seconds, in UTC, clamped to 1980..2107, 2-second steps."""
    clamped = min(max(int(epoch), DOS_EPOCH), DOS_LAST)
    t = time.gmtime(clamped)
    date = ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
    clock = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
    return date, clock


def unix_time(date: int, clock: int) -> int:
    """Unix seconds (UTC) of DOS (date, time) fields; 0 for an unset date."""
    year, month, day = 1980 + (date >> 9), (date >> 5) & 0x0F, date & 0x1F
    hour, minute, second = clock >> 11, (clock >> 5) & 0x3F, (clock & 0x1F) * 2
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return 0
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
