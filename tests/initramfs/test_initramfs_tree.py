"""The destination -> source tree, and .deb extraction (synthetic packages, no network)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from fwbuild.errors import BuildError, FormatError
from fwbuild.initramfs.cpio import read_cpio, write_cpio
from fwbuild.initramfs.deb import extract_deb, parse_ar, stage_deb
from fwbuild.initramfs.staging import StagedTree
from fwbuild.initramfs.tree import Bytes, Device, Dir, HardLink, HostFile, Symlink, Tree

EPOCH = 1700000000


# --- tree ---------------------------------------------------------------------------

def test_parents_filled_in_sorted_and_provenance(tmp_path: Path) -> None:
    host = tmp_path / "ssh"
    host.write_bytes(b"ELF?")
    host.chmod(0o755)
    tree = Tree()
    tree.add("/usr/bin/ssh", HostFile(host), ("requested",))
    tree.add("/dev/console", Device("c", 5, 1))
    tree.add("/bin/sh", Symlink("busybox"))
    assert tree.paths() == ["bin", "bin/sh", "dev", "dev/console", "usr", "usr/bin", "usr/bin/ssh"]
    assert tree.provenance()["/usr/bin"] == ["parent of /usr/bin/ssh", "requested"]
    entries = {e.name: e for e in tree.to_entries(EPOCH)}
    assert entries["usr/bin/ssh"].mode == stat.S_IFREG | 0o755
    assert entries["usr/bin/ssh"].data == b"ELF?"
    assert entries["bin/sh"].link_target == "busybox"


def test_same_source_twice_is_fine_different_source_is_an_error(tmp_path: Path) -> None:
    tree = Tree()
    tree.add("/etc/motd", Bytes(b"a"), ("recipe file",))
    tree.add("etc//motd", Bytes(b"a"), ("again",))
    tree.add("/etc", Dir())
    with pytest.raises(BuildError) as info:
        tree.add("/etc/motd", HostFile(tmp_path / "motd"), ("package base-files",))
    message = str(info.value)
    assert "/etc/motd" in message and "recipe file" in message and "package base-files" in message


def test_path_below_a_symlink_is_an_error() -> None:
    tree = Tree()
    tree.add("/lib", Symlink("usr/lib"))
    with pytest.raises(BuildError, match="/lib is a symlink"):
        tree.add("/lib/libc.so.6", Bytes(b""))


def test_bad_destinations() -> None:
    for bad in ("", "/", "../etc/passwd", "/a/../../b"):
        with pytest.raises(BuildError):
            Tree().add(bad, Bytes(b""))


def test_host_mtimes_do_not_leak_and_hard_links_group(tmp_path: Path) -> None:
    host = tmp_path / "f"
    host.write_bytes(b"data")
    os.utime(host, (EPOCH + 5000, EPOCH + 5000))
    tree = Tree()
    tree.add("/a", HostFile(host, 0o644))
    tree.add("/b", HardLink("/a"))
    first = write_cpio(tree.to_entries(EPOCH))
    os.utime(host, (EPOCH + 9000, EPOCH + 9000))
    assert write_cpio(tree.to_entries(EPOCH)) == first
    a, b = read_cpio(first)
    assert a.ino == b.ino and a.nlink == 2 and a.data == b"data" and b.data == b""


def test_unreadable_host_file_is_a_build_error(tmp_path: Path) -> None:
    tree = Tree()
    tree.add("/x", HostFile(tmp_path / "missing"))
    with pytest.raises(BuildError, match="cannot read"):
        tree.to_entries(EPOCH)


# --- .deb ---------------------------------------------------------------------------

def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    return info


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def make_deb(data_members: list[tuple[tarfile.TarInfo, bytes | None]], compression: str = "xz",
             package: str = "demo") -> bytes:
    import gzip
    import lzma

    control = _tar([(_info("./control"), f"Package: {package}\nVersion: 1.0\nArchitecture: arm64\n"
                     "Description: demo\n more text\n".encode())])
    data = _tar(data_members)
    packed = {"xz": lzma.compress, "gz": lambda b: gzip.compress(b, mtime=0),
              "zst": lambda b: zstandard.ZstdCompressor().compress(b), "tar": lambda b: b}[compression](data)
    name = "data.tar" if compression == "tar" else f"data.tar.{compression}"
    return _ar([("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(control)), (name, packed)])


GOOD = [
    (_info("./", tarfile.DIRTYPE, 0o755), None),
    (_info("./usr/bin", tarfile.DIRTYPE, 0o755), None),
    (_info("./usr/bin/tool", mode=0o4755), b"#!/bin/sh\n"),
    (_info("./usr/bin/tool2", tarfile.LNKTYPE, 0o4755, "./usr/bin/tool"), None),
    (_info("./usr/lib/libx.so.1", tarfile.SYMTYPE, 0o777, "libx.so.1.2"), None),
    (_info("./usr/lib/libx.so.1.2"), b"\x7fELF..."),
    (_info("./etc/alt", tarfile.SYMTYPE, 0o777, "/usr/bin/tool"), None),
]


@pytest.mark.parametrize("compression", ["xz", "gz", "zst", "tar"])
def test_extract_deb(tmp_path: Path, compression: str) -> None:
    contents = extract_deb(make_deb(GOOD, compression), tmp_path)
    assert contents.package == "demo"
    assert contents.control["Description"] == "demo\nmore text"
    kinds = {m.path: (m.kind, m.mode, m.target) for m in contents.members}
    assert kinds["usr/bin/tool"] == ("f", 0o4755, "")
    assert kinds["usr/bin/tool2"] == ("h", 0o4755, "usr/bin/tool")
    assert kinds["usr/lib/libx.so.1"] == ("l", 0o777, "libx.so.1.2")
    assert (tmp_path / "usr/bin/tool").read_bytes() == b"#!/bin/sh\n"
    # no setuid on the host copy, and symlinks are never created on the host
    assert stat.S_IMODE((tmp_path / "usr/bin/tool").stat().st_mode) == 0o755
    assert not (tmp_path / "usr/lib/libx.so.1").exists()
    assert not (tmp_path / "etc/alt").exists()


def test_staged_tree_resolves_links_inside_the_packages(tmp_path: Path) -> None:
    deb = tmp_path / "demo.deb"
    deb.write_bytes(make_deb(GOOD))
    contents = stage_deb(deb, tmp_path / "staged")
    assert stage_deb(deb, tmp_path / "staged") == contents  # second call: from the manifest
    tree = StagedTree.from_packages([(contents, tmp_path / "staged" / "root")])
    assert tree.resolve("/usr/lib/libx.so.1") == ("usr/lib/libx.so.1.2", ["usr/lib/libx.so.1"])
    assert tree.resolve("/etc/alt")[0] == "usr/bin/tool"
    assert tree.host_path("usr/bin/tool2").read_bytes() == b"#!/bin/sh\n"
    with pytest.raises(KeyError):
        tree.resolve("/usr/lib/missing")


@pytest.mark.parametrize("member, message", [
    ((_info("./../../etc/passwd"), b"x"), "climbs out"),
    ((_info("./usr/../../x"), b"x"), "climbs out"),
    ((_info("./usr/evil", tarfile.SYMTYPE, 0o777, "../../../etc/shadow"), None), "points out"),
    ((_info("./usr/evil", tarfile.LNKTYPE, 0o644, "../etc/shadow"), None), "climbs out"),
    ((_info("./usr/evil", tarfile.LNKTYPE, 0o644, "./etc/nothere"), None), "no such earlier member"),
])
def test_hostile_debs_are_rejected(tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None],
                                   message: str) -> None:
    with pytest.raises(FormatError, match=message):
        extract_deb(make_deb([member]), tmp_path / "out")
    assert not (tmp_path / "etc").exists() and not Path("/etc/nothere").exists()


def test_absolute_member_names_are_kept_inside(tmp_path: Path) -> None:
    contents = extract_deb(make_deb([(_info("/etc/abs"), b"abs")]), tmp_path / "out")
    assert [m.path for m in contents.members] == ["etc/abs"]
    assert (tmp_path / "out" / "etc" / "abs").read_bytes() == b"abs"


def test_not_a_deb(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="not an ar archive"):
        extract_deb(b"PK\3\4 zip", tmp_path)
    with pytest.raises(FormatError, match=r"no (control|data)\.tar"):
        extract_deb(_ar([("debian-binary", b"2.0\n")]), tmp_path)
    with pytest.raises(FormatError, match="truncated"):
        parse_ar(make_deb(GOOD)[:100])
