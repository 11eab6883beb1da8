"""The pieeprom.bin section model: layouts, update algorithm, limits, timestamps, corruption."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwbuild.eeprom.image import (
    AB_PARTITION_A,
    AB_PARTITION_B,
    FILE_MAGIC,
    IMAGE_SIZE,
    IMAGE_SIZE_2711,
    MODIFIABLE_FILES,
    PAD_MAGIC,
    RESERVED_TAIL,
    decode_timestamp,
    parse_image,
    read_timestamp,
    replace_file,
    replace_files,
    set_timestamp,
)
from fwbuild.eeprom.synthetic import (
    DEFAULT_BOOTCONF,
    DEFAULT_BOOTCONF_2711,
    is_virtual,
    synthetic_image,
)
from fwbuild.errors import BootconfError, FormatError, FwbuildError, UsageError

LAYOUTS = ("ab", "non-ab", "2711")  # 2712 AB, 2712 non-AB, 2711 (Pi 4, non-AB)
AB = synthetic_image("ab")
NON_AB = synthetic_image("non-ab")
PI4 = synthetic_image("non-ab", "2711")
IMAGES = {"ab": AB, "non-ab": NON_AB, "2711": PI4}
DEFAULTS = {"ab": DEFAULT_BOOTCONF, "non-ab": DEFAULT_BOOTCONF, "2711": DEFAULT_BOOTCONF_2711}


def reference_update(data: bytes, name: str, content: bytes) -> bytes:
    """An independent transcription of the reference rpi-eeprom-config update (for the
    cases where it is correct): walk the chain, next = next non-PAD section (else the
    partition end / tail), write len, content, 0xFF to 8, PAD header, 0xFF."""
    buf = bytearray(data)
    table = []
    offset = 0
    while offset < len(buf):
        magic, length = struct.unpack_from(">LL", buf, offset)
        if magic in (0, 0xFFFFFFFF):
            break
        fname = buf[offset + 8:offset + 20].decode().replace("\0", "") if magic == FILE_MAGIC else ""
        table.append((magic, offset, fname))
        offset = (offset + 8 + length + 7) & ~7
    lo, hi = AB_PARTITION_A  # the reference searches partition A's window on every image
    index = next(i for i, t in enumerate(table) if t[0] == FILE_MAGIC and t[2] == name and lo <= t[1] < hi)
    hdr = table[index][1]
    nxt = min(len(buf) - RESERVED_TAIL, hi)
    for magic, off, _ in table[index + 1:]:
        if magic != PAD_MAGIC:
            nxt = min(nxt, off)
            break
    struct.pack_into(">L", buf, hdr + 4, len(content) + 16)
    buf[hdr + 24:hdr + 24 + len(content)] = content
    pad_start = hdr + 24 + len(content)
    while pad_start % 8:
        buf[pad_start] = 0xFF
        pad_start += 1
    pad_bytes = nxt - pad_start
    if pad_bytes >= 8 and index != len(table) - 1:
        pad_bytes -= 8
        struct.pack_into(">LL", buf, pad_start, PAD_MAGIC, pad_bytes)
        pad_start += 8
    buf[pad_start:pad_start + pad_bytes] = b"\xff" * pad_bytes
    return bytes(buf)


def test_synthetic_is_deterministic_and_virtual() -> None:
    for layout in ("ab", "non-ab"):
        data = synthetic_image(layout)
        assert data == synthetic_image(layout)
        assert len(data) == IMAGE_SIZE
        assert is_virtual(data)
        assert parse_image(data).soc == "2712"
    assert synthetic_image("non-ab", "2711") == PI4
    assert len(PI4) == IMAGE_SIZE_2711 and is_virtual(PI4) and b"FWBUILD-VIRTUAL-2711" in PI4[:200]
    assert parse_image(PI4).soc == "2711"
    assert not is_virtual(b"\xff" * IMAGE_SIZE)
    for bad in (("abc", "2712"), ("ab", "2711"), ("non-ab", "2710")):
        with pytest.raises(UsageError):
            synthetic_image(*bad)


def test_ab_layout_matches_the_measured_offsets() -> None:
    image = parse_image(AB)
    assert image.layout == "ab"
    by_offset = {s.offset: s for s in image.sections}
    assert by_offset[0].kind == "bootcode" and by_offset[0].length == 25984
    assert by_offset[26528].name == "updatetime" and by_offset[663352].name == "updatetime"
    assert by_offset[0x10000].name == "bootsys"
    for name, offset, size in (("pubkey.bin", 0xA2000, 512), ("cacert.der", 0xA2300, 2048),
                               ("bootconf.sig", 0xA2C00, 1024), ("bootconf.txt", 0xA4000, 62)):
        assert by_offset[offset].name == name
        assert len(image.read_file(name)) == size
    assert by_offset[AB_PARTITION_B[0]].kind == "pad"
    assert by_offset[AB_PARTITION_B[0]].end == AB_PARTITION_B[1]
    assert AB[AB_PARTITION_B[1]:] == b"\xff" * 8192
    assert image.read_file("bootconf.txt") == DEFAULT_BOOTCONF
    assert any(s.kind == "lz4" for s in image.sections)


@pytest.mark.parametrize("layout", ["non-ab", "2711"])
def test_non_ab_layout(layout: str) -> None:
    image = parse_image(IMAGES[layout])
    assert image.layout == "non-ab"
    files = [s for s in image.sections if s.kind == "file"]
    assert [s.name for s in files] == ["pubkey.bin", "cacert.der", "bootconf.sig", "bootconf.txt"]
    assert all(s.offset % 4096 == 0 for s in files)
    assert image.sections[-1].name == "bootconf.txt"
    assert files[0].offset >= 128 * 1024
    assert image.read_file("bootconf.txt") == DEFAULTS[layout]


def test_2711_limits_come_from_its_table() -> None:
    image = parse_image(PI4)
    assert len(PI4) == 512 * 1024
    # pubkey.bin, cacert.der and bootconf.sig each own one 4 KiB sector: 4096 - 24 = 4072.
    assert {n: image.file_capacity(n) for n in MODIFIABLE_FILES} == {
        "bootconf.txt": 4076, "bootconf.sig": 4072, "pubkey.bin": 4072, "cacert.der": 4072}
    assert any(s.kind == "blob" for s in image.sections)
    with pytest.raises(BootconfError, match="4073 bytes, 1 over its 4072-byte slot"):
        replace_file(PI4, "bootconf.sig", b"x" * 4073)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", MODIFIABLE_FILES)
def test_round_trip_own_content(layout: str, name: str) -> None:
    data = IMAGES[layout]
    assert replace_file(data, name, parse_image(data).read_file(name)) == data


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_after_edit(layout: str) -> None:
    edited = replace_file(IMAGES[layout], "bootconf.txt", b"[all]\nBOOT_ORDER=0xf7\n")
    again = replace_file(edited, "bootconf.txt", parse_image(edited).read_file("bootconf.txt"))
    assert again == edited
    restored = replace_file(edited, "bootconf.txt", DEFAULTS[layout])
    assert restored == IMAGES[layout]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", MODIFIABLE_FILES)
@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 100, 264, 700])
def test_matches_reference_algorithm(layout: str, name: str, size: int) -> None:
    data = IMAGES[layout]
    content = bytes((i * 7 + 1) % 256 for i in range(size))
    assert replace_file(data, name, content) == reference_update(data, name, content)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shrinking_leaves_erased_bytes(layout: str) -> None:
    big = b"[all]\n" + b"".join(b"WALT_VPN_X%03d=%s\n" % (i, b"v" * 40) for i in range(40))
    grown = replace_file(IMAGES[layout], "bootconf.txt", big)
    shrunk = replace_file(grown, "bootconf.txt", b"[all]\n")
    section = parse_image(shrunk).find_file("bootconf.txt")
    old_end = section.offset + 24 + len(big)
    new_end = section.offset + 24 + 6
    tail = shrunk[new_end:old_end]
    if layout == "ab":  # bootconf.txt is not last: a PAD header follows at the next 8-byte boundary, then 0xFF
        pad_at = (new_end + 7) & ~7
        assert struct.unpack_from(">L", shrunk, pad_at)[0] == PAD_MAGIC
        tail = shrunk[new_end:pad_at] + shrunk[pad_at + 8:old_end]
    assert tail == b"\xff" * len(tail)
    assert parse_image(shrunk).read_file("bootconf.txt") == b"[all]\n"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bootconf_limit_4076(layout: str) -> None:
    data = IMAGES[layout]
    assert parse_image(data).file_capacity("bootconf.txt") == 4076
    ok = replace_file(data, "bootconf.txt", b"#" * 4076)
    assert parse_image(ok).read_file("bootconf.txt") == b"#" * 4076
    with pytest.raises(BootconfError, match="1 over"):
        replace_file(data, "bootconf.txt", b"#" * 4077)


def test_cacert_capacity_from_the_table_on_ab() -> None:
    image = parse_image(AB)
    assert image.file_capacity("cacert.der") == 2280
    assert image.file_capacity("pubkey.bin") == 744
    ok = replace_file(AB, "cacert.der", b"\x30" * 2280)
    parsed = parse_image(ok)
    assert parsed.read_file("cacert.der") == b"\x30" * 2280
    assert parsed.find_file("bootconf.sig").offset == 0xA2C00
    assert parsed.read_file("bootconf.sig") == bytes(1024)
    with pytest.raises(BootconfError, match="2284 bytes, 4 over"):
        replace_file(AB, "cacert.der", b"\x30" * 2284)


def test_gap_of_exactly_eight_gets_a_zero_length_pad() -> None:
    # pubkey.bin slot: 0xA2000..0xA2300 = 768 bytes; content 736 leaves 8 bytes.
    data = replace_file(AB, "pubkey.bin", b"\x01" * 736)
    assert struct.unpack_from(">LL", data, 0xA2000 + 24 + 736) == (PAD_MAGIC, 0)
    parsed = parse_image(data)
    assert parsed.read_file("cacert.der") == bytes(2048)
    assert replace_file(data, "pubkey.bin", b"\x01" * 736) == data


def test_last_section_gets_no_pad_header() -> None:
    data = replace_file(NON_AB, "bootconf.txt", b"[all]\n")
    image = parse_image(data)
    assert image.sections[-1].name == "bootconf.txt"
    end = image.sections[-1].offset + 24 + 6
    assert data[end:] == b"\xff" * (IMAGE_SIZE - end)


def test_edits_go_to_partition_a_only() -> None:
    data = replace_file(AB, "bootconf.txt", b"[all]\nBOOT_ORDER=0xf7\n")
    assert data[:AB_PARTITION_A[0]] == AB[:AB_PARTITION_A[0]]
    assert data[AB_PARTITION_A[1]:] == AB[AB_PARTITION_A[1]:]


def test_only_modifiable_files_can_be_replaced() -> None:
    with pytest.raises(UsageError):
        replace_file(AB, "bootsys", b"x")
    with pytest.raises(FormatError):
        replace_file(AB, "nothere.txt", b"x")


def test_timestamps() -> None:
    assert read_timestamp(AB) is None and read_timestamp(NON_AB) is None
    stamped = set_timestamp(AB, 1_700_000_000)
    assert read_timestamp(stamped) == 1_700_000_000
    expected = struct.pack("<II", 1_700_000_000 ^ 0xFFFFFFFF, 1_700_000_000)
    assert stamped[26528 + 24:26528 + 32] == expected
    assert stamped[663352 + 24:663352 + 32] == expected
    assert sum(a != b for a, b in zip(stamped, AB)) <= 16
    flat = set_timestamp(NON_AB, 1_700_000_000)
    assert flat[-8:] == expected and flat[:-8] == NON_AB[:-8]
    pi4 = set_timestamp(PI4, 1_700_000_000)
    assert pi4[-8:] == expected and pi4[:-8] == PI4[:-8] and read_timestamp(pi4) == 1_700_000_000
    assert decode_timestamp(bytes.fromhex("00000000ffffffff")) is None
    with pytest.raises(BootconfError):
        set_timestamp(AB, -1)
    with pytest.raises(BootconfError):
        set_timestamp(AB, 1 << 32)


def test_updates_are_all_or_nothing() -> None:
    with pytest.raises(BootconfError):
        replace_files(AB, {"bootconf.txt": b"ok\n", "cacert.der": b"x" * 3000}, timestamp=5)


@pytest.mark.parametrize("size", [0, 256 * 1024, IMAGE_SIZE_2711 + 8, IMAGE_SIZE - 1, IMAGE_SIZE + 1])
def test_wrong_sizes_are_refused(size: int) -> None:
    with pytest.raises(FormatError) as caught:
        parse_image(b"\xff" * size)
    message = f"{caught.value} {caught.value.hint}"
    assert "Raspberry Pi 4 (2711, 512 KiB) and Raspberry Pi 5 (2712, 2 MiB)" in message
    assert f"{size} bytes" in message


def test_corrupted_magic_and_length() -> None:
    bad = bytearray(AB)
    struct.pack_into(">L", bad, 0xA2300, 0x12345678)
    with pytest.raises(FormatError, match="bad section magic"):
        parse_image(bytes(bad))
    bad = bytearray(AB)
    struct.pack_into(">L", bad, 0xA2304, 0x7FFFFFFF)
    with pytest.raises(FormatError, match="past the end"):
        parse_image(bytes(bad))
    bad = bytearray(AB)
    bad[0xA4008:0xA4014] = b"boot\xffonf.txt"
    with pytest.raises(FormatError, match="name"):
        parse_image(bytes(bad))


def _header_offsets(data: bytes) -> list[int]:
    return [s.offset for s in parse_image(data).sections]


HEADERS = {layout: _header_offsets(IMAGES[layout]) for layout in LAYOUTS}


@st.composite
def corruptions(draw: st.DrawFn) -> tuple[str, list[tuple[int, int]]]:
    layout = draw(st.sampled_from(LAYOUTS))
    count = draw(st.integers(1, 6))
    edits = []
    for _ in range(count):
        if draw(st.booleans()):
            base = draw(st.sampled_from(HEADERS[layout]))
            position = base + draw(st.integers(0, 23))
        else:
            position = draw(st.integers(0, len(IMAGES[layout]) - 1))
        edits.append((min(position, len(IMAGES[layout]) - 1), draw(st.integers(0, 255))))
    return layout, edits


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corruptions())
def test_random_corruption_raises_format_error_only(case: tuple[str, list[tuple[int, int]]]) -> None:
    from fwbuild.eeprom.assemble import inspect_image, verify_eeprom

    layout, edits = case
    buf = bytearray(IMAGES[layout])
    for position, value in edits:
        buf[position] = value
    data = bytes(buf)
    try:
        image = parse_image(data)
    except FormatError:
        return
    # Whatever parsed must stay usable without any non-fwbuild exception.
    for call in (lambda: inspect_image(data), lambda: verify_eeprom(data), lambda: read_timestamp(image),
                 lambda: replace_file(data, "bootconf.txt", b"[all]\n")):
        try:
            call()
        except FwbuildError:
            pass
