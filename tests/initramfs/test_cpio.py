"""cpio newc: golden bytes + GNU cpio listing, round trip, property test, reproducibility."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwbuild.errors import FormatError
from fwbuild.initramfs.cpio import (
    HEADER_SIZE,
    CpioEntry,
    compress,
    decompress,
    detect_compression,
    make_reproducible,
    pack_entry,
    parse_entry,
    read_cpio,
    write_cpio,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "cpio"
EPOCH = 1700000000


def golden_entries() -> list[CpioEntry]:
    E = EPOCH
    return [
        CpioEntry("etc/motd", stat.S_IFREG | 0o644, b"hello from fwbuild\n", mtime=E + 999,
                  uid=1000, gid=1000, ino=7),
        CpioEntry("etc/motd.link", stat.S_IFREG | 0o644, b"hello from fwbuild\n", mtime=E, ino=7),
        CpioEntry("bin", stat.S_IFDIR | 0o755, mtime=E - 5),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox", mtime=E),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, b"\x7fELF not really\n", mtime=E - 100),
        CpioEntry("dev", stat.S_IFDIR | 0o755, mtime=E),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, mtime=E, rdevmajor=5, rdevminor=1),
        CpioEntry("etc", stat.S_IFDIR | 0o755, mtime=E),
        CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\nexec sh\n", mtime=E),
    ]


def golden_bytes() -> bytes:
    return write_cpio(make_reproducible(golden_entries(), EPOCH))


def test_golden_bytes() -> None:
    assert golden_bytes() == (DATA / "golden.cpio").read_bytes()


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_lists_golden() -> None:
    proc = subprocess.run(["cpio", "-it"], input=golden_bytes(), capture_output=True, check=True)
    names = proc.stdout.decode().split()
    assert names == (DATA / "golden.list").read_text().split()
    assert names == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "etc", "etc/motd",
                     "etc/motd.link", "init"]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_extracts_hard_links_and_symlinks(tmp_path: Path) -> None:
    subprocess.run(["cpio", "-idm", "--quiet"], input=golden_bytes(), cwd=tmp_path, check=True)
    motd, link = tmp_path / "etc" / "motd", tmp_path / "etc" / "motd.link"
    assert motd.read_bytes() == link.read_bytes() == b"hello from fwbuild\n"
    assert motd.stat().st_ino == link.stat().st_ino
    assert (tmp_path / "bin" / "sh").readlink() == Path("busybox")


def test_reproducible_normalisation() -> None:
    entries = read_cpio(golden_bytes())
    assert [e.name for e in entries] == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console",
                                         "etc", "etc/motd", "etc/motd.link", "init"]
    assert all(e.uid == 0 and e.gid == 0 and e.mtime <= EPOCH for e in entries)
    by_name = {e.name: e for e in entries}
    assert by_name["etc/motd"].mtime == EPOCH          # clamped from EPOCH + 999
    assert by_name["bin/busybox"].mtime == EPOCH - 100  # older stays older
    # hard links: one inode, nlink 2, data with the first member only
    assert by_name["etc/motd"].ino == by_name["etc/motd.link"].ino
    assert by_name["etc/motd"].nlink == by_name["etc/motd.link"].nlink == 2
    assert by_name["etc/motd.link"].data == b""
    # inodes renumbered from 1, unique apart from the link group
    inos = [e.ino for e in entries]
    assert len(set(inos)) == len(inos) - 1 and min(inos) == 1
    console = by_name["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdevmajor, console.rdevminor) == (5, 1)


def test_input_order_does_not_matter() -> None:
    assert write_cpio(make_reproducible(list(reversed(golden_entries())), EPOCH)) == golden_bytes()


def test_parents_come_first_even_when_names_sort_otherwise() -> None:
    entries = [CpioEntry("a-b", stat.S_IFREG | 0o644, b"x"), CpioEntry("a", stat.S_IFDIR | 0o755),
               CpioEntry("a/b", stat.S_IFREG | 0o644, b"y")]
    assert [e.name for e in make_reproducible(entries, EPOCH)] == ["a", "a/b", "a-b"]


def test_duplicate_member_is_an_error() -> None:
    entries = [CpioEntry("x", stat.S_IFREG | 0o644), CpioEntry("/x", stat.S_IFREG | 0o644)]
    with pytest.raises(FormatError, match="duplicate"):
        make_reproducible(entries, EPOCH)


def test_header_layout() -> None:
    packed = pack_entry(CpioEntry("ab", stat.S_IFREG | 0o644, b"12345", mtime=0x10, ino=3))
    assert packed[:6] == b"070701"
    assert packed[6:14] == b"00000003"           # ino
    assert packed[14:22] == b"000081A4"          # mode
    assert packed[54:62] == b"00000005"          # filesize
    assert packed[94:102] == b"00000003"         # namesize incl. NUL
    assert len(packed) % 4 == 0
    assert packed[HEADER_SIZE:HEADER_SIZE + 3] == b"ab\0"
    entry, end = parse_entry(packed, 0)
    assert end == len(packed) and entry.data == b"12345" and entry.name == "ab"


@pytest.mark.parametrize("data, message", [
    (b"", "truncated cpio header"),
    (b"070707" + b"0" * 104, "bad cpio magic"),
    (b"070701" + b"Z" * 104, "not hexadecimal"),
])
def test_bad_archives(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        read_cpio(data)


def test_truncated_data_is_reported() -> None:
    with pytest.raises(FormatError, match="truncated"):
        read_cpio(golden_bytes()[:200])


def test_compression_is_reproducible_and_detectable() -> None:
    raw = golden_bytes()
    for method in ("zstd", "xz", "gzip", "none"):
        packed = compress(raw, method)
        assert packed == compress(raw, method)
        assert detect_compression(packed) == method
        assert decompress(packed) == raw
    xz = compress(raw, "xz")
    # The stream flags name CRC32 (0x01): the kernel's xz decoder takes CRC32, not CRC64/SHA-256.
    assert xz[6:8] == b"\x00\x01"
    gz = compress(raw, "gzip")
    assert gz[4:8] == b"\0\0\0\0"  # gzip header mtime fixed to 0
    assert gzip.decompress(gz) == raw
    with pytest.raises(FormatError):
        compress(raw, "lz4")
    with pytest.raises(FormatError):
        detect_compression(b"hello")


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd not installed")
def test_zstd_cli_reads_our_stream() -> None:
    raw = golden_bytes()
    proc = subprocess.run(["zstd", "-dc"], input=compress(raw, "zstd"), capture_output=True, check=True)
    assert proc.stdout == raw


_names = st.lists(st.text(alphabet="abcxyz-_.0", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")), min_size=1, max_size=3).map("/".join)


@st.composite
def trees(draw: st.DrawFn) -> list[CpioEntry]:
    paths = draw(st.sets(_names, min_size=1, max_size=20))
    entries: dict[str, CpioEntry] = {}
    for path in sorted(paths):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            entries.setdefault(parent, CpioEntry(parent, stat.S_IFDIR | 0o755))
    for path in sorted(paths):
        if path in entries:
            continue
        kind = draw(st.sampled_from(["file", "link", "dev"]))
        mtime = draw(st.integers(0, 2**32 - 1))
        if kind == "file":
            entry = CpioEntry(path, stat.S_IFREG | draw(st.sampled_from([0o644, 0o755, 0o4755])),
                              draw(st.binary(max_size=40)), mtime=mtime,
                              uid=draw(st.integers(0, 70000)))
        elif kind == "link":
            entry = CpioEntry(path, stat.S_IFLNK | 0o777, draw(_names).encode(), mtime=mtime)
        else:
            entry = CpioEntry(path, stat.S_IFCHR | 0o600, mtime=mtime,
                              rdevmajor=draw(st.integers(0, 255)), rdevminor=draw(st.integers(0, 255)))
        entries[path] = entry
    return list(entries.values())


@settings(max_examples=150, deadline=None)
@given(trees(), st.integers(0, 2**31))
def test_property_write_read_write(entries: list[CpioEntry], epoch: int) -> None:
    normal = make_reproducible(entries, epoch)
    archive = write_cpio(normal)
    parsed = read_cpio(archive)
    assert parsed == normal                         # round trip is exact
    assert write_cpio(parsed) == archive            # and re-writing gives the same bytes
    assert make_reproducible(parsed, epoch) == parsed  # normalising is idempotent
    names = [e.name for e in parsed]
    for index, name in enumerate(names):            # every parent appears before its children
        if "/" in name:
            assert name.rsplit("/", 1)[0] in names[:index]
    source = {e.name: e for e in entries}
    for entry in parsed:
        assert entry.data == source[entry.name].data and entry.mode == source[entry.name].mode
        assert entry.mtime == min(source[entry.name].mtime, epoch) and entry.uid == 0


if __name__ == "__main__" and sys.argv[1:] == ["--regenerate"]:
    (DATA / "golden.cpio").write_bytes(golden_bytes())
    listing = subprocess.run(["cpio", "-it"], input=golden_bytes(), capture_output=True, check=True)
    (DATA / "golden.list").write_bytes(listing.stdout)


def test_zstd_bytes_do_not_depend_on_the_number_of_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import random

    rng = random.Random(4)
    raw = rng.randbytes(3 << 20) + b"\0" * (3 << 20)  # more than two 2 MiB jobs
    outputs = set()
    for cores in (1, 2, 4):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        outputs.add(compress(raw, "zstd"))
    assert len(outputs) == 1
    assert decompress(outputs.pop()) == raw
