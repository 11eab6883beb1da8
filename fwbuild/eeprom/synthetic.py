"""A synthetic, structurally faithful 2712 `pieeprom.bin` (pi5-boot-facts §1.2).

Same section table as the measured release images (AB or non-AB layout), with marker
blobs instead of firmware. Its bootcode says `FWBUILD-VIRTUAL-2712`, so nothing mistakes
it for a bootloader a real Pi 5 could run. Used by tests and the virtual recipe.
Deterministic: the same call gives the same bytes.
"""

from __future__ import annotations

import struct

from ..errors import FormatError, UsageError
from .image import (
    AB_MARKER_NAME,
    AB_PARTITION_A,
    AB_PARTITION_B,
    FILE_FMT,
    FILE_LEN_OVERHEAD,
    FILE_MAGIC,
    IMAGE_SIZE,
    LZ4_MAGIC,
    MAGIC,
    PAD_MAGIC,
    SECTION_FMT,
    SECTION_HDR_SIZE,
    TIMESTAMP_FMT,
    TIMESTAMP_UNSET,
    UPDATETIME,
    align8,
)

VIRTUAL_MARKER = b"FWBUILD-VIRTUAL-2712"
DEFAULT_BOOTCONF = b"[all]\nBOOT_UART=1\nBOOT_ORDER=0xf461\nNET_INSTALL_AT_POWER_ON=1\n"
assert len(DEFAULT_BOOTCONF) == 62

LAYOUTS = ("ab", "non-ab")
BOOTCODE_LEN = 25984  # measured bootcode length
AB_UPDATETIME_RO = 26528  # updatetime in the read-only region
AB_UPDATETIME_A = 663352  # updatetime in partition A
AB_FILE_OFFSETS = {"pubkey.bin": 0xA2000, "cacert.der": 0xA2300, "bootconf.sig": 0xA2C00,
                   "bootconf.txt": 0xA4000}
NON_AB_BLOBS_START = 128 * 1024  # bootcode padded to 128 KiB
SECTOR = 4096
LZ4_FRAME_MAGIC = bytes.fromhex("04224d18")
# Placeholder files, in image order: name, content (zero-filled, facts §1.5).
PLACEHOLDERS = (("pubkey.bin", bytes(512)), ("cacert.der", bytes(2048)),
                ("bootconf.sig", bytes(1024)))
# Compressed blobs: name, content length (odd lengths exercise the 8-byte alignment).
BLOBS = (("bootmain", 98301), ("memsys00.bin", 32765), ("memsys01.bin", 32763),
         ("mcb.bin", 16381), ("rp1c0fw.bin", 65533), ("logo.bin", 8189), ("font.bin", 4093))
BOOTSYS_LEN = 12288


def _marker(label: str, length: int, prefix: bytes = b"") -> bytes:
    text = prefix + f"{VIRTUAL_MARKER.decode()} {label}\n".encode("ascii")
    return text + bytes(length - len(text))


def _bootcode() -> bytes:
    banner = (b"BUILD_TIMESTAMP=0\nVERSION:" + VIRTUAL_MARKER
              + b"\nThis is a synthetic fwbuild image for virtual Pi 5 nodes, not a bootloader.\n")
    return banner + bytes(BOOTCODE_LEN - len(banner))


class _Writer:
    """Lays sections out in a 0xFF-filled (erased) buffer."""

    def __init__(self) -> None:
        self.buf = bytearray(b"\xff" * IMAGE_SIZE)
        self.pos = 0

    def raw(self, magic: int, content: bytes) -> None:
        struct.pack_into(SECTION_FMT, self.buf, self.pos, magic, len(content))
        start = self.pos + SECTION_HDR_SIZE
        self.buf[start:start + len(content)] = content
        self.pos = align8(start + len(content))

    def named(self, magic: int, name: str, content: bytes) -> None:
        struct.pack_into(FILE_FMT, self.buf, self.pos, magic, len(content) + FILE_LEN_OVERHEAD,
                         name.encode("ascii"), bytes(4))
        start = self.pos + struct.calcsize(FILE_FMT)
        self.buf[start:start + len(content)] = content
        self.pos = align8(start + len(content))

    def pad_to(self, target: int) -> None:
        gap = target - self.pos
        if gap < 0 or gap % 8 or 0 < gap < SECTION_HDR_SIZE:
            raise FormatError(f"synthetic layout overflow at {self.pos:#x} (target {target:#x})")
        if gap:
            struct.pack_into(SECTION_FMT, self.buf, self.pos, PAD_MAGIC, gap - SECTION_HDR_SIZE)
            self.pos = target

    def blobs(self) -> None:
        for name, length in BLOBS:
            self.named(LZ4_MAGIC, name, _marker(name, length, LZ4_FRAME_MAGIC))


def _unset_stamp() -> bytes:
    return struct.pack(TIMESTAMP_FMT, TIMESTAMP_UNSET ^ 0xFFFFFFFF, TIMESTAMP_UNSET)


def _ab_image() -> bytes:
    w = _Writer()
    w.raw(MAGIC, _bootcode())
    w.pad_to(AB_UPDATETIME_RO)
    w.named(FILE_MAGIC, UPDATETIME, _unset_stamp())
    w.pad_to(AB_PARTITION_A[0])
    w.named(FILE_MAGIC, AB_MARKER_NAME, _marker("bootsys", BOOTSYS_LEN))
    w.pad_to(0x14000)
    w.blobs()
    w.pad_to(AB_UPDATETIME_A)
    w.named(FILE_MAGIC, UPDATETIME, _unset_stamp())
    for name, content in PLACEHOLDERS:
        w.pad_to(AB_FILE_OFFSETS[name])
        w.named(FILE_MAGIC, name, content)
    w.pad_to(AB_FILE_OFFSETS["bootconf.txt"])
    w.named(FILE_MAGIC, "bootconf.txt", DEFAULT_BOOTCONF)
    w.pad_to(AB_PARTITION_A[1])
    w.pad_to(AB_PARTITION_B[1])  # partition B: one pad; the tail stays 0xFF
    return bytes(w.buf)


def _non_ab_image() -> bytes:
    w = _Writer()
    w.raw(MAGIC, _bootcode())
    w.pad_to(NON_AB_BLOBS_START)
    w.blobs()
    for name, content in (*PLACEHOLDERS, ("bootconf.txt", DEFAULT_BOOTCONF)):
        w.pad_to((w.pos + SECTOR - 1) // SECTOR * SECTOR)
        w.named(FILE_MAGIC, name, content)
    return bytes(w.buf)  # bootconf.txt is last; the last 8 bytes (timestamp) stay erased


def synthetic_image(layout: str = "ab") -> bytes:
    """A 2 MiB synthetic 2712 image in the given layout ("ab" or "non-ab")."""
    if layout == "ab":
        return _ab_image()
    if layout == "non-ab":
        return _non_ab_image()
    raise UsageError(f"unknown EEPROM layout {layout!r}", "layout", "use `ab` or `non-ab`")


def is_virtual(data: bytes) -> bool:
    """True when the bootcode says this is a synthetic fwbuild image."""
    if len(data) < SECTION_HDR_SIZE:
        return False
    magic, length = struct.unpack_from(SECTION_FMT, data, 0)
    if magic != MAGIC:
        return False
    return VIRTUAL_MARKER in data[SECTION_HDR_SIZE:SECTION_HDR_SIZE + min(length, 4096)]
