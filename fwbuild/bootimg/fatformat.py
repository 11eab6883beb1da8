"""FAT16/FAT32 on-disk headers: one struct format per header, matched pack/parse.

Used by `fat.py` (the writer and reader); see its docstring for the choices made.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

from ..errors import FormatError

SECTOR = 512
DIR_ENTRY = 32
FAT12_MAX_CLUSTERS = 4084  # at most this many data clusters: the volume is FAT12 (MS spec)
FAT16_MAX_CLUSTERS = 65524  # at most this many: FAT16; from 65525 on: FAT32
# The writer keeps clear of both edges: some readers count them off by a few.
FAT16_WRITE_MIN = 4096
FAT16_WRITE_MAX = 65500
FAT32_WRITE_MIN = 65536
MARGIN_BYTES = 64 * 1024  # free space left in a computed-size image, plus 1 % of the contents
DEFAULT_VOLUME_ID = 0x27120B00
DEFAULT_LABEL = "BOOT"

ATTR_READ_ONLY, ATTR_HIDDEN, ATTR_SYSTEM = 0x01, 0x02, 0x04
ATTR_VOLUME_ID, ATTR_DIRECTORY, ATTR_ARCHIVE = 0x08, 0x10, 0x20
ATTR_LFN = 0x0F
LFN_LAST = 0x40

# x86 boot code for both boot sectors: `int 0x18` (BIOS: try the next boot device), then `jmp $`.
_BOOT_CODE = b"\xcd\x18\xeb\xfe"

# --- boot sector, FAT12/16 flavour -----------------------------------------------------------
_BS16_FMT = (
    "<"
    "3s"  # jmp_boot: x86 jump over the BPB to the boot code (EB 3C 90)
    "8s"  # oem_name: free text
    "H"  # bytes_per_sector: 512
    "B"  # sectors_per_cluster: power of two
    "H"  # reserved_sectors: sectors before the first FAT (boot sector included)
    "B"  # num_fats: copies of the FAT
    "H"  # root_entries: 32-byte entries in the fixed root directory
    "H"  # total_sectors16: sector count when < 65536, else 0
    "B"  # media: 0xF8 fixed disk
    "H"  # fat_sectors16: sectors per FAT
    "H"  # sectors_per_track: CHS geometry (unused)
    "H"  # num_heads: CHS geometry (unused)
    "I"  # hidden_sectors: sectors before the volume (the partition start)
    "I"  # total_sectors32: sector count when total_sectors16 is 0
    "B"  # drive_number: 0x80
    "B"  # reserved1: 0
    "B"  # boot_signature: 0x29, the next three fields are valid
    "I"  # volume_id: serial number
    "11s"  # volume_label: space-padded, same as the root directory label entry
    "8s"  # fs_type: "FAT16   " (informative only)
    "448s"  # boot_code
    "H"  # signature: 0xAA55
)
assert struct.calcsize(_BS16_FMT) == SECTOR

# --- boot sector, FAT32 flavour -----------------------------------------------------------------
_BS32_FMT = (
    "<"
    "3s"  # jmp_boot: EB 58 90
    "8s"  # oem_name
    "H"  # bytes_per_sector
    "B"  # sectors_per_cluster
    "H"  # reserved_sectors: 32, holding the FSInfo and backup boot sectors
    "B"  # num_fats
    "H"  # root_entries: 0 on FAT32 (the root directory is a cluster chain)
    "H"  # total_sectors16: 0 on FAT32
    "B"  # media
    "H"  # fat_sectors16: 0 on FAT32 (this is how readers tell FAT32)
    "H"  # sectors_per_track
    "H"  # num_heads
    "I"  # hidden_sectors
    "I"  # total_sectors32
    "I"  # fat_sectors32: sectors per FAT
    "H"  # ext_flags: 0 = every FAT is mirrored
    "H"  # fs_version: 0.0
    "I"  # root_cluster: first cluster of the root directory
    "H"  # fsinfo_sector: sector of the FSInfo structure
    "H"  # backup_boot_sector: sector of the boot sector copy
    "12s"  # reserved: zeros
    "B"  # drive_number
    "B"  # reserved1
    "B"  # boot_signature: 0x29
    "I"  # volume_id
    "11s"  # volume_label
    "8s"  # fs_type: "FAT32   "
    "420s"  # boot_code
    "H"  # signature: 0xAA55
)
assert struct.calcsize(_BS32_FMT) == SECTOR

# --- FAT32 FSInfo sector ---------------------------------------------------------------------------
_FSINFO_FMT = (
    "<"
    "I"  # lead_signature: 0x41615252 "RRaA"
    "480s"  # reserved: zeros
    "I"  # struct_signature: 0x61417272 "rrAa"
    "I"  # free_count: free clusters
    "I"  # next_free: hint, first free cluster
    "12s"  # reserved: zeros
    "I"  # trail_signature: 0xAA550000
)
assert struct.calcsize(_FSINFO_FMT) == SECTOR
_FSINFO_LEAD, _FSINFO_STRUCT, _FSINFO_TRAIL = 0x41615252, 0x61417272, 0xAA550000

# --- 8.3 directory entry ---------------------------------------------------------------------------
_DIRENT_FMT = (
    "<"
    "11s"  # name: 8 + 3 bytes, space-padded, no dot
    "B"  # attr: ATTR_* bits
    "B"  # nt_case: NT lower-case flags (0x08 base, 0x10 extension)
    "B"  # create_time_tenth: 0..199 hundredths of the 2-second step
    "H"  # create_time: DOS time
    "H"  # create_date: DOS date
    "H"  # access_date: DOS date
    "H"  # first_cluster_hi: high 16 bits (FAT32)
    "H"  # write_time: DOS time
    "H"  # write_date: DOS date
    "H"  # first_cluster_lo: low 16 bits
    "I"  # size: bytes (0 for directories)
)
assert struct.calcsize(_DIRENT_FMT) == DIR_ENTRY

# --- VFAT long-name entry ------------------------------------------------------------------------
_LFN_FMT = (
    "<"
    "B"  # order: sequence number 1..20, | 0x40 on the last (first stored) entry
    "10s"  # name1: UTF-16LE characters 1-5
    "B"  # attr: 0x0F
    "B"  # type: 0
    "B"  # checksum: of the 8.3 name that follows
    "12s"  # name2: characters 6-11
    "H"  # first_cluster: 0
    "4s"  # name3: characters 12-13
)
assert struct.calcsize(_LFN_FMT) == DIR_ENTRY


@dataclass(frozen=True)
class BootSector:
    """The fields of a FAT boot sector; FAT32-only fields are 0 on FAT16."""

    fat_type: Literal[16, 32]
    sectors_per_cluster: int
    reserved_sectors: int
    num_fats: int
    root_entries: int
    total_sectors: int
    fat_sectors: int
    hidden_sectors: int
    volume_id: int
    label: str
    root_cluster: int = 0
    fsinfo_sector: int = 0
    backup_boot_sector: int = 0
    media: int = 0xF8

    @property
    def cluster_size(self) -> int:
        return self.sectors_per_cluster * SECTOR

    @property
    def root_dir_sectors(self) -> int:
        return (self.root_entries * DIR_ENTRY + SECTOR - 1) // SECTOR

    @property
    def data_start(self) -> int:
        """First sector of cluster 2."""
        return self.reserved_sectors + self.num_fats * self.fat_sectors + self.root_dir_sectors

    @property
    def clusters(self) -> int:
        return (self.total_sectors - self.data_start) // self.sectors_per_cluster


def pack_boot_sector(bs: BootSector) -> bytes:
    label = bs.label.upper().ljust(11).encode("ascii")
    common = (b"fwbuild ", SECTOR, bs.sectors_per_cluster, bs.reserved_sectors, bs.num_fats)
    geometry = (bs.media,)
    chs = (32, 64, bs.hidden_sectors)
    if bs.fat_type == 32:
        return struct.pack(
            _BS32_FMT, b"\xeb\x58\x90", *common, 0, 0, *geometry, 0, *chs, bs.total_sectors,
            bs.fat_sectors, 0, 0, bs.root_cluster, bs.fsinfo_sector, bs.backup_boot_sector,
            bytes(12), 0x80, 0, 0x29, bs.volume_id, label, b"FAT32   ",
            _BOOT_CODE.ljust(420, b"\0"), 0xAA55)
    small = bs.total_sectors if bs.total_sectors < 0x10000 else 0
    large = 0 if small else bs.total_sectors
    return struct.pack(
        _BS16_FMT, b"\xeb\x3c\x90", *common, bs.root_entries, small, *geometry, bs.fat_sectors,
        *chs, large, 0x80, 0, 0x29, bs.volume_id, label, b"FAT16   ",
        _BOOT_CODE.ljust(448, b"\0"), 0xAA55)


def parse_boot_sector(data: bytes, where: str = "boot sector") -> BootSector:
    if len(data) < SECTOR:
        raise FormatError(f"image is {len(data)} bytes, too short for a FAT boot sector", where)
    head = struct.unpack(_BS16_FMT, data[:SECTOR])
    (_, _, bps, spc, reserved, nfats, root_entries, tot16, media, fat16, _, _, hidden, tot32,
     _, _, sig16, volid16, label16, _, _, signature) = head
    if signature != 0xAA55 or bps != SECTOR:
        raise FormatError("not a FAT file system with 512-byte sectors (no 0x55AA signature)",
                          where, "is this a whole disk image? give the partition (offset)")
    if spc == 0 or spc & (spc - 1) or nfats == 0 or reserved == 0:
        raise FormatError("corrupt FAT boot sector (cluster size, FAT count or reserved sectors)",
                          where)
    total = tot16 or tot32
    if fat16 == 0:
        f32 = struct.unpack(_BS32_FMT, data[:SECTOR])
        fat_sectors, root_cluster, fsinfo, backup = f32[14], f32[17], f32[18], f32[19]
        sig, volid, label = f32[23], f32[24], f32[25]
        bs = BootSector(32, spc, reserved, nfats, 0, total, fat_sectors, hidden,
                        volid if sig == 0x29 else 0, label.decode("latin-1").rstrip(),
                        root_cluster, fsinfo, backup, media)
    else:
        bs = BootSector(16, spc, reserved, nfats, root_entries, total, fat16, hidden,
                        volid16 if sig16 == 0x29 else 0, label16.decode("latin-1").rstrip(),
                        media=media)
    if bs.fat_sectors == 0 or bs.data_start >= total:
        raise FormatError("corrupt FAT boot sector (FAT size or sector count)", where)
    if bs.fat_type == 16 and bs.clusters <= FAT12_MAX_CLUSTERS:
        raise FormatError(f"FAT12 volume ({bs.clusters} clusters) is not supported", where)
    return bs


def pack_fsinfo(free_count: int, next_free: int) -> bytes:
    return struct.pack(_FSINFO_FMT, _FSINFO_LEAD, bytes(480), _FSINFO_STRUCT, free_count,
                       next_free, bytes(12), _FSINFO_TRAIL)


def parse_fsinfo(data: bytes) -> tuple[int, int]:
    """(free_count, next_free) of an FSInfo sector."""
    lead, _, mid, free, nxt, _, trail = struct.unpack(_FSINFO_FMT, data[:SECTOR])
    if (lead, mid, trail) != (_FSINFO_LEAD, _FSINFO_STRUCT, _FSINFO_TRAIL):
        raise FormatError("bad FSInfo signatures", "FSInfo sector")
    return free, nxt


@dataclass(frozen=True)
class DirEntry:
    """A parsed 8.3 directory entry."""

    short: bytes
    attr: int
    nt_case: int
    first_cluster: int
    size: int
    write_date: int
    write_time: int


def pack_dirent(entry: DirEntry, create: tuple[int, int]) -> bytes:
    date, clock = create
    return struct.pack(_DIRENT_FMT, entry.short, entry.attr, entry.nt_case, 0, clock, date, date,
                       entry.first_cluster >> 16, entry.write_time, entry.write_date,
                       entry.first_cluster & 0xFFFF, entry.size)


def parse_dirent(raw: bytes) -> DirEntry:
    (short, attr, nt_case, _, _, _, _, hi, wtime, wdate, lo, size) = struct.unpack(_DIRENT_FMT, raw)
    return DirEntry(short, attr, nt_case, (hi << 16) | lo, size, wdate, wtime)


def pack_lfn(order: int, chunk: bytes, checksum: int) -> bytes:
    return struct.pack(_LFN_FMT, order, chunk[:10], ATTR_LFN, 0, checksum, chunk[10:22], 0,
                       chunk[22:26])


def parse_lfn(raw: bytes) -> tuple[int, bytes, int]:
    """(order, 26-byte name chunk, checksum) of a long-name entry."""
    order, n1, _, _, checksum, n2, _, n3 = struct.unpack(_LFN_FMT, raw)
    return order, n1 + n2 + n3, checksum


