"""FAT16/FAT32 file systems without a partition table: a pure, deterministic writer and reader.

Bytes in, bytes out; no host I/O. The on-disk headers are in `fatformat.py`, the
name and timestamp rules in `fatnames.py`.

Which FAT type, and why (`fat_type="auto"`): clusters are one 512-byte sector
(the least slack for an image every node downloads). FAT32 is only valid with at
least 65525 data clusters, i.e. a volume of ~33 MB or more. The boot facts
recommend "plain FAT32", but a FAT32 `boot.img` for a 15 MB kernel + initramfs
would have to be padded to ~33 MB of mostly zeros that every node would download,
often over a slow link. So contents that fit FAT16 (fewer than ~65500 clusters)
give FAT16 - what usbboot's `mkfs.fat -C -f 1 -n BOOT -S 512 -r 256` also makes
at those sizes, so the bootloader reads it - and larger contents give FAT32.
`fat_type=16` / `32` force a type: FAT32 then pads to its minimum, FAT16 doubles
its cluster size until the contents fit. `total_sectors` fixes the volume size
(the recovery disk image's partition).

Deterministic: fixed volume id and label, every timestamp from `epoch` (UTC, DOS
2-second steps, clamped to 1980..2107), directory entries sorted by name,
contiguous allocation in a depth-first walk of the sorted tree, size computed
from the contents plus a margin of 64 KiB + 1 %.

Names: plain 8.3 entries for names that fit (`config.txt`, `overlays`, with the
NT lower-case flags), VFAT long names only when needed (`kernel_2712.img`).
Paths use `/`; directories are implied by file paths (`overlays/x.dtbo`); names
compare case-insensitively, as on FAT.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..errors import BuildError, FormatError
from . import fatnames
from .fatformat import (
    ATTR_ARCHIVE,
    ATTR_DIRECTORY,
    ATTR_LFN,
    ATTR_VOLUME_ID,
    DEFAULT_LABEL,
    DEFAULT_VOLUME_ID,
    DIR_ENTRY,
    FAT16_WRITE_MAX,
    FAT16_WRITE_MIN,
    FAT32_WRITE_MIN,
    LFN_LAST,
    MARGIN_BYTES,
    SECTOR,
    BootSector,
    DirEntry,
    pack_boot_sector,
    pack_dirent,
    pack_fsinfo,
    pack_lfn,
    parse_boot_sector,
    parse_dirent,
    parse_lfn,
)

FatType = Literal["auto", 16, 32]


@dataclass(frozen=True)
class FatEntry:
    """A file or directory as the reader lists it (`path` uses `/`)."""

    path: str
    size: int
    mtime: int
    is_dir: bool
    first_cluster: int = field(default=0, compare=False)


@dataclass(eq=False)
class _Node:
    name: str
    data: bytes | None = None  # None: a directory
    children: dict[str, _Node] = field(default_factory=dict)  # key: upper-case name
    short: bytes = b""
    nt_case: int = 0
    lfn: bool = False
    first_cluster: int = 0
    nclusters: int = 0

    @property
    def is_dir(self) -> bool:
        return self.data is None

    def sorted_children(self) -> list[_Node]:
        return sorted(self.children.values(), key=lambda n: n.name)


# --------------------------------------------------------------------------- writer


def _tree(files: Mapping[str, bytes]) -> _Node:
    root = _Node("")
    for path in sorted(files):
        data = files[path]
        if not isinstance(path, str) or not isinstance(data, (bytes, bytearray)):
            raise FormatError("file paths must be str and contents bytes", repr(path))
        parts = path.strip("/").split("/")
        node = root
        for i, part in enumerate(parts):
            fatnames.validate_long_name(part, path)
            key = part.upper()
            last = i == len(parts) - 1
            existing = node.children.get(key)
            if last:
                if existing is not None:
                    raise FormatError(f"{path!r} clashes with {existing.name!r} (FAT names ignore "
                                      "case) or with a directory", path)
                node.children[key] = _Node(part, bytes(data))
            else:
                if existing is None:
                    existing = node.children[key] = _Node(part)
                elif not existing.is_dir:
                    raise FormatError(f"{existing.name!r} is both a file and a directory", path)
                node = existing
    return root


def _assign_names(directory: _Node) -> None:
    children = directory.sorted_children()
    taken: set[bytes] = set()
    for child in children:
        exact = fatnames.exact_short_name(child.name)
        if exact is not None:
            child.short, child.nt_case = exact
            taken.add(child.short)
    for child in children:
        if not child.short:
            child.lfn = True
            child.short = fatnames.alias_short_name(child.name, taken)
        if child.is_dir:
            _assign_names(child)


def _entry_count(directory: _Node) -> int:
    """32-byte entries: label or dot entries, then each child's LFN entries and 8.3 entry."""
    count = 1 if directory.name == "" else 2
    for child in directory.children.values():
        count += 1 + (len(fatnames.lfn_chunks(child.name)) if child.lfn else 0)
    return count


def _walk(directory: _Node) -> list[_Node]:
    """Every node below `directory`, depth-first in sorted order (the allocation order)."""
    out: list[_Node] = []
    for child in directory.sorted_children():
        out.append(child)
        if child.is_dir:
            out.extend(_walk(child))
    return out


def _cluster_counts(root: _Node, cluster: int, fat32: bool) -> int:
    total = 0
    for node in [root, *_walk(root)]:
        if node.is_dir:
            if node is root and not fat32:
                node.nclusters = 0  # FAT16: fixed root directory region
            else:
                node.nclusters = -(-_entry_count(node) * DIR_ENTRY // cluster)
        else:
            assert node.data is not None
            node.nclusters = -(-len(node.data) // cluster)
        total += node.nclusters
    return total


def _geometry(root: _Node, fat_type: Literal[16, 32], spc: int, num_fats: int, hidden: int,
              total_sectors: int | None, label: str, volume_id: int) -> BootSector | None:
    """The boot sector of a volume holding `root`, or None when it does not fit."""
    cluster = spc * SECTOR
    used = _cluster_counts(root, cluster, fat_type == 32)
    entry_bytes = 4 if fat_type == 32 else 2
    reserved = 32 if fat_type == 32 else 1
    root_entries = 0
    if fat_type == 16:
        root_entries = max(512, -(-_entry_count(root) // 16) * 16)
    root_sectors = root_entries * DIR_ENTRY // SECTOR
    if total_sectors is None:
        margin = -(-(MARGIN_BYTES + used * cluster // 100) // cluster)
        clusters = max(used + margin, FAT32_WRITE_MIN if fat_type == 32 else FAT16_WRITE_MIN)
        fat_sectors = -(-(clusters + 2) * entry_bytes // SECTOR)
        total = reserved + num_fats * fat_sectors + root_sectors + clusters * spc
    else:
        total = total_sectors
        fat_sectors = -(-(total // spc + 2) * entry_bytes // SECTOR)
        clusters = (total - reserved - num_fats * fat_sectors - root_sectors) // spc
        if clusters < used:
            raise BuildError(f"the files need {used} clusters, the {total}-sector volume has "
                             f"{max(clusters, 0)}", hint="make the volume larger")
    if fat_type == 16 and not FAT16_WRITE_MIN <= clusters <= FAT16_WRITE_MAX:
        return None
    if fat_type == 32 and clusters < FAT32_WRITE_MIN:
        if total_sectors is not None:
            raise BuildError(f"a {total}-sector volume is too small for FAT32 with "
                             f"{cluster}-byte clusters ({clusters} < 65525 clusters)")
        return None
    return BootSector(fat_type, spc, reserved, num_fats, root_entries, total, fat_sectors, hidden,
                      volume_id, label, 2 if fat_type == 32 else 0, 1 if fat_type == 32 else 0,
                      6 if fat_type == 32 else 0)


def _choose(root: _Node, fat_type: FatType, spc: int | None, num_fats: int, hidden: int,
            total_sectors: int | None, label: str, volume_id: int) -> BootSector:
    if fat_type == "auto":
        plans: list[tuple[Literal[16, 32], int]] = [(16, spc or 1), (32, spc or 1)]
    elif fat_type == 16:
        plans = [(16, spc)] if spc else [(16, 1 << i) for i in range(7)]
    elif fat_type == 32:
        plans = [(32, spc or 1)]
    else:
        raise FormatError(f"unknown FAT type {fat_type!r}", hint="use auto, 16 or 32")
    for kind, sectors in plans:
        if sectors not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise FormatError(f"sectors per cluster must be a power of two <= 128, not {sectors}")
        bs = _geometry(root, kind, sectors, num_fats, hidden, total_sectors, label, volume_id)
        if bs is not None:
            return bs
    raise BuildError(f"the files do not fit a FAT{fat_type} volume", hint="use fat_type='auto'")


def _largest(files: Mapping[str, bytes], count: int = 5) -> str:
    biggest = sorted(files.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:count]
    return ", ".join(f"{path} ({len(data) / 1e6:.1f} MB)" for path, data in biggest)


def _validate_label(label: str) -> bytes:
    raw = label.upper()
    if not 1 <= len(raw) <= 11 or not all(c == " " or fatnames.exact_short_name(c) for c in raw):
        raise FormatError(f"invalid volume label {label!r}",
                          hint="1-11 characters: letters, digits, space, !#$%&'()-@^_`{}~")
    return raw.ljust(11).encode("ascii")


def _fat_table(nodes: list[_Node], fat_type: int, fat_sectors: int, media: int) -> bytes:
    table = array("I" if fat_type == 32 else "H", bytes(fat_sectors * SECTOR))
    eoc = 0x0FFFFFFF if fat_type == 32 else 0xFFFF
    table[0] = (0x0FFFFF00 if fat_type == 32 else 0xFF00) | media
    table[1] = eoc  # clean-shutdown and no-error bits set
    for node in nodes:
        first, count = node.first_cluster, node.nclusters
        if count:  # a contiguous chain: each cluster points to the next, the last ends it
            table[first:first + count - 1] = array(table.typecode, range(first + 1, first + count))
            table[first + count - 1] = eoc
    if sys.byteorder == "big":  # pragma: no cover
        table.byteswap()
    return table.tobytes()


def _dir_bytes(directory: _Node, parent: _Node | None, label: bytes, stamp: tuple[int, int]) -> bytes:
    date, clock = stamp
    out = bytearray()
    if parent is None:
        out += pack_dirent(DirEntry(label, ATTR_VOLUME_ID, 0, 0, 0, date, clock), stamp)
    else:
        up = 0 if parent.name == "" else parent.first_cluster  # ".." of a root child is 0
        for name, cluster in ((b".", directory.first_cluster), (b"..", up)):
            out += pack_dirent(DirEntry(name.ljust(11), ATTR_DIRECTORY, 0, cluster, 0, date,
                                        clock), stamp)
    for child in directory.sorted_children():
        if child.lfn:
            chunks = fatnames.lfn_chunks(child.name)
            checksum = fatnames.short_checksum(child.short)
            for seq in range(len(chunks), 0, -1):
                order = seq | (LFN_LAST if seq == len(chunks) else 0)
                out += pack_lfn(order, chunks[seq - 1], checksum)
        attr = ATTR_DIRECTORY if child.is_dir else ATTR_ARCHIVE
        size = 0 if child.data is None else len(child.data)
        out += pack_dirent(DirEntry(child.short, attr, child.nt_case, child.first_cluster, size,
                                    date, clock), stamp)
    return bytes(out)


def build_fat(
    files: Mapping[str, bytes],
    *,
    epoch: int,
    label: str = DEFAULT_LABEL,
    volume_id: int = DEFAULT_VOLUME_ID,
    fat_type: FatType = "auto",
    sectors_per_cluster: int | None = None,
    num_fats: int = 1,
    total_sectors: int | None = None,
    hidden_sectors: int = 0,
    max_bytes: int | None = None,
    where: str = "FAT image",
) -> bytes:
    """A FAT volume holding `files` ({"dir/name": bytes}), byte-identical for the same inputs.

    Raises FormatError for bad names and BuildError when the volume would exceed
    `max_bytes` (naming the largest files) or `total_sectors` is too small.
    """
    label_raw = _validate_label(label)
    root = _tree(files)
    _assign_names(root)
    bs = _choose(root, fat_type, sectors_per_cluster, num_fats, hidden_sectors, total_sectors,
                 label_raw.decode().rstrip(), volume_id & 0xFFFFFFFF)
    size = bs.total_sectors * SECTOR
    if max_bytes is not None and size > max_bytes:
        raise BuildError(
            f"the FAT image would be {size} bytes ({size / 1e6:.1f} MB), over the "
            f"{max_bytes} bytes ({max_bytes / 1e6:.0f} MB) limit", where,
            hint=f"largest files: {_largest(files)}")
    nodes = [root, *_walk(root)]
    next_cluster = 2
    for node in nodes:
        if node is root and bs.fat_type == 16:
            continue
        node.first_cluster = next_cluster if node.nclusters else 0
        next_cluster += node.nclusters
    if bs.fat_type == 16:
        root.first_cluster = 0

    image = bytearray(size)
    boot = pack_boot_sector(bs)
    image[0:SECTOR] = boot
    if bs.fat_type == 32:
        free = bs.clusters - (next_cluster - 2)
        fsinfo = pack_fsinfo(free, next_cluster if free else 0xFFFFFFFF)
        for base in (0, bs.backup_boot_sector):
            image[(base + 0) * SECTOR:(base + 1) * SECTOR] = boot
            image[(base + 1) * SECTOR:(base + 2) * SECTOR] = fsinfo
    table = _fat_table(nodes, bs.fat_type, bs.fat_sectors, bs.media)
    for copy in range(bs.num_fats):
        start = (bs.reserved_sectors + copy * bs.fat_sectors) * SECTOR
        image[start:start + len(table)] = table

    stamp = fatnames.dos_datetime(epoch)
    parents: dict[int, _Node] = {}
    for node in nodes:
        for child in node.children.values():
            parents[id(child)] = node
    cluster_bytes = bs.cluster_size
    data_start = bs.data_start * SECTOR
    for node in nodes:
        if node.is_dir:
            content = _dir_bytes(node, parents.get(id(node)), label_raw, stamp)
            if node is root and bs.fat_type == 16:
                offset = (bs.reserved_sectors + bs.num_fats * bs.fat_sectors) * SECTOR
                image[offset:offset + len(content)] = content
                continue
        else:
            assert node.data is not None
            content = node.data
        if content:
            offset = data_start + (node.first_cluster - 2) * cluster_bytes
            image[offset:offset + len(content)] = content
    return bytes(image)


# --------------------------------------------------------------------------- reader


@dataclass(frozen=True, eq=False)
class FatVolume:
    """A parsed FAT volume: its boot sector and entries, depth-first in directory order."""

    boot: BootSector
    entries: tuple[FatEntry, ...]
    free_clusters: int
    image: bytes = field(repr=False)
    table: array[int] = field(repr=False)
    where: str = "FAT image"

    @property
    def fat_type(self) -> int:
        return self.boot.fat_type

    def describe(self) -> str:
        """One line: FAT type and why, label, volume id, size (the `bootimg list` header)."""
        bs = self.boot
        if bs.fat_type == 32:
            why = f"{bs.clusters} clusters >= 65525, FAT32's minimum"
        else:
            why = f"{bs.clusters} clusters < 65525, too few for FAT32 without padding"
        return (f"FAT{bs.fat_type} ({why}; {bs.cluster_size}-byte clusters), label "
                f"{bs.label or '-'}, volume id {bs.volume_id:08X}, "
                f"{bs.total_sectors * SECTOR} bytes, {self.free_clusters * bs.cluster_size} "
                "bytes free")

    def find(self, path: str) -> FatEntry:
        wanted = path.strip("/").upper()
        for entry in self.entries:
            if entry.path.upper() == wanted:
                return entry
        raise FormatError(f"no such file: {path}", self.where,
                          "list the image to see its files")

    def read(self, path: str) -> bytes:
        """The bytes of the file at `path` (case-insensitive)."""
        entry = self.find(path)
        if entry.is_dir:
            raise FormatError(f"{path} is a directory", self.where)
        return self._read_chain(entry.first_cluster, entry.size, entry.path)

    def files(self) -> dict[str, bytes]:
        """Every file: {path: bytes}."""
        return {e.path: self._read_chain(e.first_cluster, e.size, e.path)
                for e in self.entries if not e.is_dir}

    def _chain(self, first: int, what: str) -> list[int]:
        eoc = 0x0FFFFFF8 if self.boot.fat_type == 32 else 0xFFF8
        last = self.boot.clusters + 1
        chain: list[int] = []
        cluster = first
        while True:
            if not 2 <= cluster <= last:
                raise FormatError(f"cluster chain of {what} points outside the volume "
                                  f"({cluster})", self.where)
            if len(chain) > self.boot.clusters:
                raise FormatError(f"cluster chain of {what} loops", self.where)
            chain.append(cluster)
            value = self.table[cluster] & (0x0FFFFFFF if self.boot.fat_type == 32 else 0xFFFF)
            if value >= eoc:
                return chain
            if value in (0, eoc - 1):
                raise FormatError(f"cluster chain of {what} hits a free or bad cluster",
                                  self.where)
            cluster = value

    def _read_clusters(self, first: int, what: str) -> bytes:
        size = self.boot.cluster_size
        base = self.boot.data_start * SECTOR
        return b"".join(self.image[base + (c - 2) * size: base + (c - 1) * size]
                        for c in self._chain(first, what))

    def _read_chain(self, first: int, size: int, what: str) -> bytes:
        if size == 0:
            return b""
        data = self._read_clusters(first, what)
        if len(data) < size:
            raise FormatError(f"{what} is {size} bytes but its clusters hold {len(data)}",
                              self.where)
        return data[:size]


def _parse_dir(raw: bytes, prefix: str, volume: FatVolume, out: list[FatEntry],
               seen: set[int]) -> None:
    pending: list[tuple[int, bytes, int]] = []
    for offset in range(0, len(raw) - DIR_ENTRY + 1, DIR_ENTRY):
        chunk = raw[offset:offset + DIR_ENTRY]
        if chunk[0] == 0x00:
            return
        if chunk[0] == 0xE5:
            pending = []
            continue
        if chunk[11] & 0x3F == ATTR_LFN:
            pending.append(parse_lfn(chunk))
            continue
        entry = parse_dirent(chunk)
        lfn, pending = pending, []
        if entry.attr & ATTR_VOLUME_ID or entry.short[:1] == b".":
            continue
        name = fatnames.short_display(entry.short, entry.nt_case)
        checksum = fatnames.short_checksum(entry.short)
        orders = [order & 0x1F for order, _, _ in lfn]
        if (lfn and lfn[0][0] & LFN_LAST and orders == list(range(len(lfn), 0, -1))
                and all(c == checksum for _, _, c in lfn)):
            name = fatnames.lfn_decode(chunk for _, chunk, _ in reversed(lfn))
        path = f"{prefix}{name}"
        is_dir = bool(entry.attr & ATTR_DIRECTORY)
        mtime = fatnames.unix_time(entry.write_date, entry.write_time)
        out.append(FatEntry(path, 0 if is_dir else entry.size, mtime, is_dir, entry.first_cluster))
        if is_dir:
            if entry.first_cluster in seen or entry.first_cluster < 2:
                raise FormatError(f"directory {path} loops or has no cluster", volume.where)
            seen.add(entry.first_cluster)
            _parse_dir(volume._read_clusters(entry.first_cluster, path), path + "/", volume,
                       out, seen)


def read_fat(image: bytes, where: str = "FAT image") -> FatVolume:
    """Parse a FAT16/FAT32 volume (no partition table) and list its entries."""
    bs = parse_boot_sector(image, where)
    if len(image) < bs.total_sectors * SECTOR:
        raise FormatError(f"image is truncated: {len(image)} bytes, its boot sector says "
                          f"{bs.total_sectors * SECTOR}", where,
                          "copy or download the whole file again")
    start = bs.reserved_sectors * SECTOR
    table = array("I" if bs.fat_type == 32 else "H",
                  image[start:start + bs.fat_sectors * SECTOR])
    if sys.byteorder == "big":  # pragma: no cover
        table.byteswap()
    if len(table) < bs.clusters + 2:
        raise FormatError("the FAT is smaller than the cluster count", where)
    mask = 0x0FFFFFFF if bs.fat_type == 32 else 0xFFFF
    free = sum(1 for value in table[2:bs.clusters + 2] if value & mask == 0)
    entries: list[FatEntry] = []
    volume = FatVolume(bs, (), free, image, table, where)
    if bs.fat_type == 32:
        root = volume._read_clusters(bs.root_cluster, "the root directory")
    else:
        offset = (bs.reserved_sectors + bs.num_fats * bs.fat_sectors) * SECTOR
        root = image[offset:offset + bs.root_entries * DIR_ENTRY]
    _parse_dir(root, "", volume, entries, {bs.root_cluster})
    return FatVolume(bs, tuple(entries), free, image, table, where)


def read_file(image: bytes, path: str, where: str = "FAT image") -> bytes:
    """The bytes of one file of a FAT volume."""
    return read_fat(image, where).read(path)


def read_all(image: bytes, where: str = "FAT image") -> dict[str, bytes]:
    """Every file of a FAT volume: {path: bytes}."""
    return read_fat(image, where).files()
