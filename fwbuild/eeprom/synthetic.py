"""A synthetic, structurally faithful `pieeprom.bin` (pi5-boot-facts §1.2, §3).

2712 (Raspberry Pi 5, 2 MiB): the section table of the measured release images (AB or
non-AB layout). 2711 (Raspberry Pi 4, 512 KiB): the non-AB layout of the Pi 4 images
(bootcode padded to 128 KiB, opaque blobs, then the four modifiable files on 4 KiB
boundaries, bootconf.txt last). Marker blobs replace the firmware; the bootcode says
`FWBUILD-VIRTUAL-2712` (or `-2711`), so nothing mistakes it for a bootloader a real Pi
could run. Used by tests and the virtual recipe. Deterministic: the same call gives the
same bytes.
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
    IMAGE_SIZE_2711,
    LZ4_MAGIC,
    MAGIC,
    OLD_BLOB_MAGIC,
    PAD_MAGIC,
    SECTION_FMT,
    SECTION_HDR_SIZE,
    TIMESTAMP_FMT,
    TIMESTAMP_UNSET,
    UPDATETIME,
    align8,
)

VIRTUAL_MARKER = b"FWBUILD-VIRTUAL-2712"
VIRTUAL_PREFIX = b"FWBUILD-VIRTUAL-27"  # 2711 images say FWBUILD-VIRTUAL-2711
DEFAULT_BOOTCONF_2711 = b"[all]\nBOOT_UART=0\nWAKE_ON_GPIO=1\nPOWER_OFF_ON_HALT=0\n"
DEFAULT_BOOTCONF = b"[all]\nBOOT_UART=1\nBOOT_ORDER=0xf461\nNET_INSTALL_AT_POWER_ON=1\n"
assert len(DEFAULT_BOOTCONF) == 62

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
# 2711 blobs (0x55aaf33f, opaque): name, content length.
BLOBS_2711 = (("memsys00.bin", 14023), ("memsys01.bin", 12213), ("mcb.bin", 3131),
              ("vl805hub.bin", 7028), ("vl805mcu.bin", 60403), ("logo.bin", 7645), ("font.bin", 8007))
BOOTCODE_LEN_2711 = 122436  # the bootcode length of a signed-boot capable 2711 image


def _marker(label: str, length: int, prefix: bytes = b"", marker: bytes = VIRTUAL_MARKER) -> bytes:
    text = prefix + f"{marker.decode()} {label}\n".encode("ascii")
    return text + bytes(length - len(text))


def _bootcode(soc: str = "2712") -> bytes:
    marker = VIRTUAL_PREFIX + soc[-2:].encode()
    board = "Pi 5" if soc == "2712" else "Pi 4"
    banner = (b"BUILD_TIMESTAMP=0\nVERSION:" + marker
              + f"\nThis is a synthetic fwbuild image for virtual {board} nodes, not a bootloader.\n".encode())
    return banner + bytes((BOOTCODE_LEN if soc == "2712" else BOOTCODE_LEN_2711) - len(banner))


class _Writer:
    """Lays sections out in a 0xFF-filled (erased) buffer."""

    def __init__(self, size: int = IMAGE_SIZE) -> None:
        self.buf = bytearray(b"\xff" * size)
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


def _image_2711() -> bytes:
    w = _Writer(IMAGE_SIZE_2711)
    w.raw(MAGIC, _bootcode("2711"))
    w.pad_to(NON_AB_BLOBS_START)
    marker = VIRTUAL_PREFIX + b"11"
    for name, length in BLOBS_2711:
        w.named(OLD_BLOB_MAGIC, name, _marker(name, length, marker=marker))
    placeholders = (("pubkey.bin", bytes(264)), ("cacert.der", bytes(2048)), ("bootconf.sig", bytes(1024)))
    for name, content in (*placeholders, ("bootconf.txt", DEFAULT_BOOTCONF_2711)):
        w.pad_to((w.pos + SECTOR - 1) // SECTOR * SECTOR)
        w.named(FILE_MAGIC, name, content)
    return bytes(w.buf)


def synthetic_image(layout: str = "ab", soc: str = "2712") -> bytes:
    """A synthetic image: 2712 (2 MiB) in the given layout ("ab" or "non-ab"), or 2711
    (512 KiB, Raspberry Pi 4), which only exists in the non-AB layout."""
    if soc == "2711":
        if layout != "non-ab":
            raise UsageError(f"2711 (Raspberry Pi 4) images have no {layout!r} layout", "layout",
                             "use `non-ab` with 2711")
        return _image_2711()
    if soc != "2712":
        raise UsageError(f"unknown SoC {soc!r}", "soc", "use 2711 (Raspberry Pi 4) or 2712 (Raspberry Pi 5)")
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
    return VIRTUAL_PREFIX in data[SECTION_HDR_SIZE:SECTION_HDR_SIZE + min(length, 4096)]
