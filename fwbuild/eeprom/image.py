"""The `pieeprom.bin` section table of Raspberry Pi 4 (2711, 512 KiB) and Raspberry Pi 5
(2712, 2 MiB) EEPROM images (pi5-boot-facts §1). Pure: bytes in, bytes out.

An image is a chain of 8-byte aligned sections, each `magic(4) len(4)` big-endian, the
next one at align8(offset + 8 + len). Named files (`bootconf.txt`, `pubkey.bin`, ...)
carry a 24-byte header and their content at +24. Two layouts exist: the AB layout
(partition A at [0x10000, 0x107000) holds the editable files; detected by a `bootsys`
file at 0x10000) and the older non-AB layout (one chain, `bootconf.txt` last).

Updates follow the reference `rpi-eeprom-config` algorithm (facts §1.3) byte for byte,
including its edit window: files are looked up in [0x10000, 0x107000) on every image (the
AB partition A; on non-AB images the same window, cut at the image end), and a slot
ends at the next non-PAD section, at the window end or 4 KiB before the image end.
One deliberate difference: the capacity check counts the real 24-byte header (the
reference counts 20 and lets a 4-byte overflow corrupt the next section or the
bootloader's last 4 KiB); such edits are refused instead of written.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import BootconfError, FormatError, UsageError

IMAGE_SIZE = 2 * 1024 * 1024  # 2712 (Raspberry Pi 5)
IMAGE_SIZE_2711 = 512 * 1024  # 2711 (Raspberry Pi 4)
IMAGE_SIZES = {IMAGE_SIZE_2711: "2711", IMAGE_SIZE: "2712"}  # size -> SoC
SUPPORTED_BOARDS = ("Raspberry Pi 4 (2711, 512 KiB) and Raspberry Pi 5 (2712, 2 MiB) "
                    "pieeprom.bin images")
RESERVED_TAIL = 4096  # the last 4 KiB belong to the bootloader (scratch page)
MAX_FILE_CONTENT = 4076  # one 4 KiB erase sector minus the reference's 20-byte header

MAGIC = 0x55AAF00F  # first section: bootcode, content at +8, no name
MAGIC_MASK = 0xFFFFF00F  # every valid magic satisfies (m & MAGIC_MASK) == MAGIC
FILE_MAGIC = 0x55AAF11F  # modifiable named file
OLD_BLOB_MAGIC = 0x55AAF33F  # blobs of the 2023 images (opaque)
LZ4_MAGIC = 0x55AAF44F  # compressed blob, same 24-byte header as a file, LZ4 frame payload
PAD_MAGIC = 0x55AAFEEF  # padding: magic, len, then len bytes of 0xFF
END_MAGICS = (0x00000000, 0xFFFFFFFF)  # parsing stops at either

# Section header: every section starts with it.
SECTION_FMT = (
    ">"  # big-endian
    "I"  # magic
    "I"  # len: bytes after this 8-byte header (the next section is at align8(offset + 8 + len))
)
SECTION_HDR_SIZE = 8
assert struct.calcsize(SECTION_FMT) == SECTION_HDR_SIZE

# Named file header (FILE_MAGIC and LZ4_MAGIC): the section header, then the name.
FILE_FMT = (
    ">"  # big-endian
    "I"  # magic
    "I"  # len = 16 + content length (name + reserved + content)
    "12s"  # name, ASCII, NUL padded (`bootconf.txt` fills all 12 bytes)
    "4s"  # reserved, zero
)
FILE_HDR_SIZE = 24
assert struct.calcsize(FILE_FMT) == FILE_HDR_SIZE
FILE_LEN_OVERHEAD = FILE_HDR_SIZE - SECTION_HDR_SIZE  # 16: name + reserved
LEN_FMT = (
    ">"  # big-endian
    "I"  # the len field alone (at section offset + 4)
)
assert struct.calcsize(LEN_FMT) == 4
NAME_SIZE = 12

# The update timestamp (facts §1.4): ~ts then ts, both little-endian u32.
TIMESTAMP_FMT = (
    "<"  # little-endian
    "I"  # ~ts
    "I"  # ts
)
TIMESTAMP_SIZE = 8
assert struct.calcsize(TIMESTAMP_FMT) == TIMESTAMP_SIZE
TIMESTAMP_UNSET = 0xFFFFFFFF  # `00000000 ffffffff`

# AB layout (measured on the 2026-08-12 release): partitions as [start, end).
AB_PARTITION_A = (0x10000, 0x107000)
AB_PARTITION_B = (0x107000, 0x1FE000)
AB_MARKER_NAME = "bootsys"  # the name at 0x10008 on AB images
UPDATETIME = "updatetime"

MODIFIABLE_FILES = ("bootconf.txt", "bootconf.sig", "pubkey.bin", "cacert.der")


def align8(value: int) -> int:
    return (value + 7) & ~7


@dataclass(frozen=True)
class Section:
    """One entry of the section table."""

    offset: int
    magic: int
    length: int  # the header's len field
    name: str = ""  # files and LZ4 blobs only

    @property
    def end(self) -> int:
        """Offset of the next section."""
        return align8(self.offset + SECTION_HDR_SIZE + self.length)

    @property
    def kind(self) -> str:
        return {
            MAGIC: "bootcode",
            FILE_MAGIC: "file",
            LZ4_MAGIC: "lz4",
            OLD_BLOB_MAGIC: "blob",
            PAD_MAGIC: "pad",
        }.get(self.magic, "opaque")

    @property
    def content_offset(self) -> int:
        header = FILE_HDR_SIZE if self.magic in (FILE_MAGIC, LZ4_MAGIC) else SECTION_HDR_SIZE
        return self.offset + header

    @property
    def content_length(self) -> int:
        if self.magic in (FILE_MAGIC, LZ4_MAGIC):
            return self.length - FILE_LEN_OVERHEAD
        return self.length


@dataclass(frozen=True)
class FileSlot:
    """Where an update of a modifiable file may write: [section.offset, limit)."""

    section: Section
    limit: int  # offset of the next non-PAD section, bounded by the partition and the tail
    is_last: bool  # last section of the whole table (no PAD header is written after it)

    @property
    def capacity(self) -> int:
        """The largest content that fits (facts §1.1: space minus 24, rounded down to 8)."""
        space = (self.limit - self.section.offset - FILE_HDR_SIZE) & ~7
        return max(0, min(space, MAX_FILE_CONTENT))


@dataclass(frozen=True)
class EepromImage:
    """A parsed image: the bytes, the layout and the section table."""

    data: bytes
    layout: str  # "ab" | "non-ab"
    sections: tuple[Section, ...]

    @property
    def soc(self) -> str:
        """`2711` (Raspberry Pi 4) or `2712` (Raspberry Pi 5), from the image size."""
        return IMAGE_SIZES[len(self.data)]

    @property
    def edit_partition(self) -> tuple[int, int]:
        """The [start, end) range whose files edits go to: partition A, on every layout
        (the reference tool's window; on non-AB images it holds every modifiable file)."""
        return AB_PARTITION_A[0], min(AB_PARTITION_A[1], len(self.data))

    def files(self) -> tuple[Section, ...]:
        return tuple(s for s in self.sections if s.magic == FILE_MAGIC)

    def find_file(self, name: str) -> Section:
        """The named file (in partition A on AB images)."""
        start, end = self.edit_partition
        for section in self.sections:
            if section.magic == FILE_MAGIC and section.name == name and start <= section.offset < end:
                return section
        where = "partition A" if self.layout == "ab" else "image"
        present = [s.name for s in self.sections
                   if s.magic == FILE_MAGIC and start <= s.offset < end and s.name != AB_MARKER_NAME]
        board = "Raspberry Pi 4 (2711)" if self.soc == "2711" else "Raspberry Pi 5 (2712)"
        raise FormatError(f"no `{name}` file in the EEPROM {where}", name,
                          f"this {board} {self.layout} image has: {', '.join(present) or 'no named files'}"
                          " (older images lack the signed-boot files)")

    def has_file(self, name: str) -> bool:
        try:
            self.find_file(name)
        except FormatError:
            return False
        return True

    def read_file(self, name: str) -> bytes:
        section = self.find_file(name)
        return self.data[section.content_offset:section.content_offset + section.content_length]

    def slot(self, name: str) -> FileSlot:
        """The update slot of a modifiable file (facts §1.3 step 1)."""
        section = self.find_file(name)
        index = self.sections.index(section)
        _, part_end = self.edit_partition
        limit = min(len(self.data) - RESERVED_TAIL, part_end)
        for following in self.sections[index + 1:]:
            if following.magic != PAD_MAGIC:
                limit = min(limit, following.offset)
                break
        return FileSlot(section, limit, index == len(self.sections) - 1)

    def file_capacity(self, name: str) -> int:
        return self.slot(name).capacity


def _section_name(data: bytes, offset: int, magic: int) -> str:
    raw = data[offset + SECTION_HDR_SIZE:offset + SECTION_HDR_SIZE + NAME_SIZE]
    name = raw.rstrip(b"\0")
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if magic == FILE_MAGIC and (not text.isprintable() or b"\0" in name or not text):
        raise FormatError("file section has a name that is not NUL-padded ASCII",
                          f"offset {offset:#x}", "the image is corrupted")
    return text if text.isprintable() else ""


def parse_image(data: bytes) -> EepromImage:
    """Parse the section table; raise FormatError on any inconsistency."""
    if len(data) not in IMAGE_SIZES:
        raise FormatError(f"EEPROM image is {len(data)} bytes, not {IMAGE_SIZE_2711} (2711) "
                          f"or {IMAGE_SIZE} (2712)", hint=f"supported: {SUPPORTED_BOARDS}")
    sections: list[Section] = []
    offset = 0
    while offset + SECTION_HDR_SIZE <= len(data):
        magic, length = struct.unpack_from(SECTION_FMT, data, offset)
        if magic in END_MAGICS:
            break
        if (magic & MAGIC_MASK) != MAGIC:
            raise FormatError(f"bad section magic {magic:#010x}", f"offset {offset:#x}",
                              "the image is corrupted")
        if offset + SECTION_HDR_SIZE + length > len(data):
            raise FormatError(f"section of {length} bytes runs past the end of the image",
                              f"offset {offset:#x}", "the image is corrupted")
        name = ""
        if magic in (FILE_MAGIC, LZ4_MAGIC):
            if length < FILE_LEN_OVERHEAD:
                raise FormatError(f"file section len {length} is shorter than its name",
                                  f"offset {offset:#x}", "the image is corrupted")
            name = _section_name(data, offset, magic)
        if magic == MAGIC and sections:
            raise FormatError("a second bootcode section", f"offset {offset:#x}")
        if not sections and magic != MAGIC:
            raise FormatError("the image does not start with a bootcode section", "offset 0x0")
        sections.append(Section(offset, magic, length, name))
        offset = align8(offset + SECTION_HDR_SIZE + length)
    if not sections:
        raise FormatError("the image has no sections", "offset 0x0", "is this a pieeprom.bin?")
    starts = {s.offset: s for s in sections}
    marker = starts.get(AB_PARTITION_A[0])
    if marker is not None and marker.magic == FILE_MAGIC and marker.name == AB_MARKER_NAME:
        if AB_PARTITION_A[1] not in starts and sections[-1].end != AB_PARTITION_A[1]:
            raise FormatError("partition A does not end on a section boundary",
                              f"offset {AB_PARTITION_A[1]:#x}", "the image is corrupted")
        layout = "ab"
    else:
        layout = "non-ab"
    return EepromImage(bytes(data), layout, tuple(sections))


def _check_fits(slot: FileSlot, content: bytes) -> None:
    section = slot.section
    if section.name not in MODIFIABLE_FILES:
        raise UsageError(f"`{section.name}` is not a modifiable EEPROM file", section.name,
                         f"modifiable files: {', '.join(MODIFIABLE_FILES)}")
    if len(content) > slot.capacity or section.offset + FILE_HDR_SIZE + len(content) > slot.limit:
        over = len(content) - slot.capacity
        raise BootconfError(
            f"`{section.name}` content is {len(content)} bytes, {over} over its "
            f"{slot.capacity}-byte slot", section.name,
            "the limit comes from the image's section table (next section minus the 24-byte header)")


def _file_region(data: bytes, slot: FileSlot, content: bytes) -> bytes:
    """The new bytes of [file offset, slot limit): the reference update algorithm
    (facts §1.3 steps 2-4): new len, content at +24, 0xFF to the 8-byte boundary, a PAD
    header when >= 8 bytes remain (and the file is not the last section), 0xFF."""
    _check_fits(slot, content)
    offset = slot.section.offset
    end = offset + FILE_HDR_SIZE + len(content)
    aligned = align8(end)
    parts = [data[offset:offset + 4], struct.pack(LEN_FMT, len(content) + FILE_LEN_OVERHEAD),
             data[offset + SECTION_HDR_SIZE:offset + FILE_HDR_SIZE], content, b"\xff" * (aligned - end)]
    remaining = slot.limit - aligned
    if remaining >= SECTION_HDR_SIZE and not slot.is_last:
        parts.append(struct.pack(SECTION_FMT, PAD_MAGIC, remaining - SECTION_HDR_SIZE))
        remaining -= SECTION_HDR_SIZE
    parts.append(b"\xff" * remaining)
    return b"".join(parts)


def replace_files(
    data: bytes,
    updates: Mapping[str, bytes],
    *,
    timestamp: int | None = None,
    image: EepromImage | None = None,
) -> bytes:
    """Replace several modifiable files (and optionally set the timestamp) in one copy.

    Each update only rewrites [file offset, next non-PAD section), so the slots of the
    original table stay valid for all of them. Every check runs before the output is built.
    """
    parsed = image if image is not None else parse_image(data)
    patches: list[tuple[int, int, bytes]] = []
    for name, content in updates.items():
        slot = parsed.slot(name)
        patches.append((slot.section.offset, slot.limit, _file_region(parsed.data, slot, content)))
    if timestamp is not None:
        stamp = encode_timestamp(timestamp)
        patches += [(o, o + TIMESTAMP_SIZE, stamp) for o in _timestamp_offsets(parsed)]
    patches.sort()
    view = memoryview(parsed.data)
    pieces: list[bytes | memoryview] = []
    position = 0
    for start, stop, region in patches:
        if start < position:
            raise UsageError("two updates of the same EEPROM region", f"offset {start:#x}")
        pieces += [view[position:start], region]
        position = stop
    pieces.append(view[position:])
    return b"".join(pieces)


def replace_file(data: bytes, name: str, content: bytes) -> bytes:
    """`data` with the content of the modifiable file `name` replaced."""
    return replace_files(data, {name: content})


def encode_timestamp(ts: int) -> bytes:
    if not 0 <= ts < TIMESTAMP_UNSET:
        raise BootconfError(f"update timestamp {ts} is not a 32-bit unix time", "timestamp",
                          "use unix seconds between 0 and 4294967294")
    return struct.pack(TIMESTAMP_FMT, ts ^ 0xFFFFFFFF, ts)


def decode_timestamp(raw: bytes) -> int | None:
    """The timestamp in 8 stamp bytes, or None when unset or inconsistent."""
    if len(raw) != TIMESTAMP_SIZE:
        raise FormatError(f"an update timestamp is 8 bytes, not {len(raw)}", UPDATETIME)
    inverse, ts = struct.unpack(TIMESTAMP_FMT, raw)
    if ts == TIMESTAMP_UNSET or inverse != ts ^ 0xFFFFFFFF:
        return None
    return int(ts)


def _timestamp_offsets(image: EepromImage) -> list[int]:
    if image.layout != "ab":
        return [len(image.data) - TIMESTAMP_SIZE]
    stamps = [s for s in image.sections if s.magic == FILE_MAGIC and s.name == UPDATETIME]
    if not stamps:
        raise FormatError("AB image without an `updatetime` file", UPDATETIME)
    for stamp in stamps:
        if stamp.content_length != TIMESTAMP_SIZE:
            raise FormatError(f"`updatetime` holds {stamp.content_length} bytes, expected 8",
                              f"offset {stamp.offset:#x}")
    return [s.content_offset for s in stamps]


def set_timestamp(data: bytes, ts: int) -> bytes:
    """Set the update timestamp (both `updatetime` files on AB, the last 8 bytes otherwise)."""
    return replace_files(data, {}, timestamp=ts)


def read_timestamp(data: bytes | EepromImage) -> int | None:
    """The update timestamp, or None when unset (partition A's `updatetime` on AB)."""
    image = data if isinstance(data, EepromImage) else parse_image(data)
    offsets = _timestamp_offsets(image)
    if image.layout == "ab":
        start, end = AB_PARTITION_A
        in_a = [o for o in offsets if start <= o < end]
        offsets = in_a or offsets
    return decode_timestamp(image.data[offsets[0]:offsets[0] + TIMESTAMP_SIZE])
