"""The ready-to-flash recovery SD image: MBR + one FAT32 partition (pi5-boot-facts §5).

Like the official recovery images: MBR label id 0x0a7b5ac5, one partition of
type 0x0c (FAT32 LBA) at sector 2048, formatted like `mkfs.fat -F 32 -s 1`
(1 sector per cluster, 32 reserved sectors, 2 FATs, FSInfo at 1, backup boot
sector at 6). Pure: bytes in, bytes out.

Partition size: the official images use 524288 sectors (256 MiB). FAT32 with
512-byte clusters needs >= 65525 clusters (~33 MiB), and the kit is ~2.2 MB, so
this image uses 131072 sectors (64 MiB): twice FAT32's minimum, room for a
config.txt or a second image, and a 65 MiB image instead of 257 MiB to hold in
memory, store and write to a card. The free space is zeros, so the image file
is written sparse (`device.write_kit` skips zero blocks on regular files).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ..bootimg.fat import FatVolume, build_fat, read_fat
from ..errors import FormatError

SECTOR = 512
MBR_LABEL_ID = 0x0A7B5AC5
PARTITION_START = 2048  # sectors: 1 MiB alignment, as the official images
PARTITION_SECTORS = 131072  # 64 MiB (see the module docstring)
PARTITION_TYPE_FAT32_LBA = 0x0C
VOLUME_LABEL = "RECOVERY"
VOLUME_ID = 0x27120EC0
_HEADS, _SECTORS_PER_TRACK = 255, 63

# --- MBR (sector 0) ----------------------------------------------------------------------------
_MBR_FMT = (
    "<"
    "440s"  # boot_code: zeros (the Pi never runs it)
    "I"  # disk_signature: the "label-id" sfdisk shows
    "H"  # reserved: 0 (0x5A5A would mean copy-protected)
    "64s"  # partitions: four 16-byte entries (_PART_FMT)
    "H"  # signature: 0xAA55
)
assert struct.calcsize(_MBR_FMT) == SECTOR

# --- MBR partition entry -------------------------------------------------------------------------
_PART_FMT = (
    "<"
    "B"  # status: 0x80 bootable, 0x00 not
    "3s"  # chs_first: CHS of the first sector (legacy, capped)
    "B"  # type: 0x0C FAT32 with LBA
    "3s"  # chs_last: CHS of the last sector (legacy, capped)
    "I"  # lba_first: first sector
    "I"  # sectors: length in sectors
)
assert struct.calcsize(_PART_FMT) == 16


@dataclass(frozen=True)
class MbrPartition:
    index: int  # 1..4
    type: int
    start: int  # sectors
    sectors: int
    bootable: bool = False


def _chs(lba: int) -> bytes:
    cylinder, rest = divmod(lba, _HEADS * _SECTORS_PER_TRACK)
    if cylinder > 1023:
        return b"\xfe\xff\xff"
    head, sector = divmod(rest, _SECTORS_PER_TRACK)
    return bytes([head, ((cylinder >> 2) & 0xC0) | (sector + 1), cylinder & 0xFF])


def pack_mbr(label_id: int, partitions: list[MbrPartition]) -> bytes:
    entries = b""
    for part in sorted(partitions, key=lambda p: p.index):
        entries += struct.pack(_PART_FMT, 0x80 if part.bootable else 0, _chs(part.start),
                               part.type, _chs(part.start + part.sectors - 1), part.start,
                               part.sectors)
    return struct.pack(_MBR_FMT, bytes(440), label_id, 0, entries.ljust(64, b"\0"), 0xAA55)


def parse_mbr(data: bytes, where: str = "disk image") -> tuple[int, list[MbrPartition]]:
    """(label id, non-empty partitions) of an MBR disk."""
    if len(data) < SECTOR:
        raise FormatError("too short for an MBR", where)
    _, label_id, _, entries, signature = struct.unpack(_MBR_FMT, data[:SECTOR])
    if signature != 0xAA55:
        raise FormatError("no MBR signature (0x55AA) in sector 0", where)
    parts = []
    for index in range(4):
        status, _, kind, _, start, sectors = struct.unpack(
            _PART_FMT, entries[index * 16:(index + 1) * 16])
        if kind and sectors:
            parts.append(MbrPartition(index + 1, kind, start, sectors, status == 0x80))
    return label_id, parts


def recovery_disk_image(files: Mapping[str, bytes], epoch: int,
                        partition_sectors: int = PARTITION_SECTORS) -> bytes:
    """The SD image: MBR, one type-0x0c partition at sector 2048 holding `files` on FAT32."""
    fat = build_fat(files, epoch=epoch, label=VOLUME_LABEL, volume_id=VOLUME_ID, fat_type=32,
                    sectors_per_cluster=1, num_fats=2, total_sectors=partition_sectors,
                    hidden_sectors=PARTITION_START)
    mbr = pack_mbr(MBR_LABEL_ID, [MbrPartition(1, PARTITION_TYPE_FAT32_LBA, PARTITION_START,
                                               partition_sectors)])
    return mbr + bytes((PARTITION_START - 1) * SECTOR) + fat


def disk_partition(image: bytes, where: str = "disk image") -> bytes:
    """The bytes of the single FAT partition of a recovery disk image."""
    _, parts = parse_mbr(image, where)
    fat_parts = [p for p in parts if p.type in (0x0B, 0x0C, 0x0E, 0x06)]
    if len(fat_parts) != 1:
        raise FormatError(f"expected one FAT partition, found {len(fat_parts)}", where)
    part = fat_parts[0]
    end = (part.start + part.sectors) * SECTOR
    if end > len(image):
        raise FormatError(f"partition ends at byte {end}, beyond the {len(image)}-byte image",
                          where, "the image or device is truncated")
    return image[part.start * SECTOR:end]


def read_disk_image(image: bytes, where: str = "disk image") -> FatVolume:
    """Parse the FAT volume of a recovery disk image."""
    return read_fat(disk_partition(image, where), where)
