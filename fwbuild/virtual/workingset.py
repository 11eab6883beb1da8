"""Boot working sets: the blocks of a root image a boot reads, fetched ahead by the node.

A reference boot of the virtual node (image mode) runs against `RecordingSshd`, a
`TestSshd` whose SFTP subsystem is wrapped by one more relay that logs every READ
(`R <offset> <length> <path>`). The blocks the boot read become a `WorkingSet` of
4 KiB block ranges in ascending order (ranges closer than `gap` blocks merged).

On disk the set is a text file next to the image, `<image>.prefetch`:

    fwbuild-prefetch 1
    image-sha256 <sha256 of the whole image>
    image-size <bytes>
    probe-sha256 <sha256 of the image's first 64 KiB>
    block 4096
    ranges <n>
    <first block> <block count>      (n lines; ascending as recorded, any order read)
    end

It is keyed by the root's digest: `publish_working_set` writes it only when the
image's sha256 is the recorded one and removes a stale one otherwise, so a changed
root never gets an old set. The node cannot hash a remote image, so the init checks
what it can read cheaply (size, and the first 64 KiB: superblock and group
descriptors, which change with any change of the file system) and otherwise boots
normally with one console line; so does a missing or unreadable set.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError
from ..fsutil import atomic_write
from .sshd import TestSshd

BLOCK = 4096
PROBE = 65536
MAGIC = "fwbuild-prefetch 1"
SUFFIX = ".prefetch"


class RecordingSshd(TestSshd):
    """A TestSshd whose SFTP log also holds the READ offsets (`R offset length path` lines,
    written by the gate's SFTP server): `read_log` is that log."""

    def __init__(self, workdir: Path, **kwargs: object) -> None:
        super().__init__(workdir, **kwargs)  # type: ignore[arg-type]
        self.read_log = self.sftp_log


def parse_read_log(text: str, path: str) -> list[tuple[int, int]]:
    """(offset, length) of the READs of `path`, in log order (a torn last line is ignored)."""
    reads = []
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if (len(parts) == 4 and parts[0] == "R" and parts[3].replace("\\x20", " ") == path
                and parts[1].isdigit() and parts[2].isdigit()):
                reads.append((int(parts[1]), int(parts[2])))
    return reads


@dataclass(frozen=True)
class WorkingSet:
    image_sha256: str
    image_size: int
    probe_sha256: str
    ranges: tuple[tuple[int, int], ...]      # (first block, block count), ascending
    block: int = BLOCK

    @property
    def blocks(self) -> int:
        return sum(count for _, count in self.ranges)

    def render(self) -> str:
        lines = [MAGIC, f"image-sha256 {self.image_sha256}", f"image-size {self.image_size}",
                 f"probe-sha256 {self.probe_sha256}", f"block {self.block}", f"ranges {len(self.ranges)}"]
        lines += [f"{start} {count}" for start, count in self.ranges]
        return "\n".join([*lines, "end"]) + "\n"


def image_digests(image: Path) -> tuple[str, int, str]:
    """(sha256 of the image, its size, sha256 of its first 64 KiB)."""
    whole = hashlib.sha256()
    with image.open("rb") as handle:
        probe = handle.read(PROBE)
        whole.update(probe)
        while chunk := handle.read(1 << 20):
            whole.update(chunk)
    return whole.hexdigest(), image.stat().st_size, hashlib.sha256(probe).hexdigest()


def coalesce(reads: Iterable[tuple[int, int]], *, gap_blocks: int = 16,
             block: int = BLOCK) -> tuple[tuple[int, int], ...]:
    """Block ranges covering `reads`, in ascending block order; ranges closer than
    `gap_blocks` are merged (the gap is fetched too).

    Offset order, not first-access order: the node fetches the whole set before it
    mounts the image, so the order does not matter to the boot, but every range costs
    the node one reader process (a fork+exec, slow on the virtual node's TCG CPU) and
    the boot's reads of one file arrive in several places of the access order. The
    reference Debian boot: 398 ranges in access order, 57 in offset order (gap 16) for
    0.4 MB more; the prefetch on LAN took 7.5 s of guest CPU instead of 27.6 s.
    """
    blocks: set[int] = set()
    for offset, length in reads:
        if length > 0:
            blocks.update(range(offset // block, (offset + length - 1) // block + 1))
    out: list[list[int]] = []
    for number in sorted(blocks):
        if out and number - (out[-1][0] + out[-1][1]) <= gap_blocks:
            out[-1][1] = number + 1 - out[-1][0]
        else:
            out.append([number, 1])
    return tuple((start, count) for start, count in out)


def working_set_from_reads(reads: Sequence[tuple[int, int]], image: Path, *,
                           gap_blocks: int = 16) -> WorkingSet:
    sha, size, probe = image_digests(image)
    limit = (size + BLOCK - 1) // BLOCK
    ranges = tuple((s, min(c, limit - s)) for s, c in coalesce(reads, gap_blocks=gap_blocks) if s < limit)
    return WorkingSet(sha, size, probe, ranges)


_HEX = re.compile(r"[0-9a-f]{64}")


def parse_working_set(text: str, where: str = "working set") -> WorkingSet:
    """The set file's contents; FormatError (with the line) on anything unexpected."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()

    def field(index: int, name: str) -> str:
        if index >= len(lines) or not lines[index].startswith(name + " "):
            raise FormatError(f"expected `{name} ...` on line {index + 1}", where)
        return lines[index][len(name) + 1:]

    if not lines or lines[0] != MAGIC:
        raise FormatError("not a working-set file (bad first line)", where, f"it starts with `{MAGIC}`")
    sha, size, probe, block, count = (field(1, "image-sha256"), field(2, "image-size"),
                                      field(3, "probe-sha256"), field(4, "block"), field(5, "ranges"))
    if not (_HEX.fullmatch(sha) and _HEX.fullmatch(probe) and size.isdigit() and count.isdigit()
            and block == str(BLOCK)):
        raise FormatError("bad working-set header", where)
    n = int(count)
    if len(lines) != 6 + n + 1 or lines[-1] != "end":
        raise FormatError(f"the working set announces {n} ranges and does not end after them", where)
    limit = (int(size) + BLOCK - 1) // BLOCK
    ranges = []
    for number, line in enumerate(lines[6:6 + n], start=7):
        parts = line.split(" ")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise FormatError(f"bad range on line {number}: {line[:40]!r}", where)
        start, blocks = int(parts[0]), int(parts[1])
        if blocks == 0 or start + blocks > limit:
            raise FormatError(f"range on line {number} is empty or past the image's end", where)
        ranges.append((start, blocks))
    return WorkingSet(sha, int(size), probe, tuple(ranges))


def set_path(image: Path) -> Path:
    return image.with_name(image.name + SUFFIX)


def publish_working_set(ws: WorkingSet, image: Path) -> Path | None:
    """Write `<image>.prefetch` when `ws` was recorded for this very image (sha256);
    otherwise remove a set lying there (it would be stale) and return None."""
    path = set_path(image)
    if image_digests(image)[0] != ws.image_sha256:
        path.unlink(missing_ok=True)
        return None
    atomic_write(path, ws.render().encode())
    return path


def load_working_set(image: Path) -> WorkingSet | None:
    """The published set of `image` if there is one and it belongs to the image as it is now."""
    path = set_path(image)
    try:
        ws = parse_working_set(path.read_text(), str(path))
    except FileNotFoundError:
        return None
    sha, size, probe = image_digests(image)
    if (ws.image_sha256, ws.image_size, ws.probe_sha256) != (sha, size, probe):
        return None
    return ws


def remove_working_set(image: Path) -> None:
    try:
        os.unlink(set_path(image))
    except FileNotFoundError:
        pass
