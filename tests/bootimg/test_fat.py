"""The pure FAT writer/reader, checked against dosfstools (fsck.fat) and mtools."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fwbuild.bootimg import fatnames
from fwbuild.bootimg.fat import build_fat, read_all, read_fat, read_file
from fwbuild.bootimg.fatformat import (
    BootSector,
    pack_boot_sector,
    parse_boot_sector,
    parse_fsinfo,
)
from fwbuild.errors import BuildError, FormatError

EPOCH = 1_700_000_000  # 2023-11-14T22:13:20Z (even: DOS keeps 2-second steps)


def _blob(seed: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def boot_tree() -> dict[str, bytes]:
    return {
        "config.txt": b"initramfs initramfs_2712 followkernel\n",
        "cmdline.txt": b"console=ttyAMA10,115200 rdinit=/init\n",
        "kernel_2712.img": _blob("kernel", 1_234_567),
        "initramfs_2712": _blob("initramfs", 700_001),
        "bcm2712-rpi-5-b.dtb": _blob("dtb1", 80_000),
        "bcm2712d0-rpi-5-b.dtb": _blob("dtb2", 80_100),
        "overlays/vc4-kms-v3d-pi5.dtbo": _blob("ov", 4_000),
        "overlays/README": b"",
        "EMPTY.TXT": b"",
        "Mixed.Case": b"m",
    }


def _fsck(path: Path) -> str:
    result = subprocess.run(["fsck.fat", "-n", "-v", str(path)], check=False,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lowered = result.stdout.lower()
    for word in ("differ", "wrong", "bad", "invalid", "lost", "free cluster summary wrong"):
        assert word not in lowered, result.stdout
    return result.stdout


def _mtools_paths(image: Path, offset: str = "") -> list[str]:
    result = subprocess.run(["mdir", "-i", f"{image}{offset}", "-/", "-b", "::"],
                            capture_output=True, text=True, check=True)
    return [line[3:] for line in result.stdout.splitlines() if line.startswith("::/")]


def _mcopy(image: Path, path: str, offset: str = "") -> bytes:
    return subprocess.run(["mcopy", "-n", "-i", f"{image}{offset}", f"::{path}", "-"],
                          capture_output=True, check=True).stdout


def _check_with_tools(tmp_path: Path, image: bytes, files: dict[str, bytes]) -> None:
    path = tmp_path / "fs.img"
    path.write_bytes(image)
    _fsck(path)
    listed = _mtools_paths(path)
    dirs = {p.rsplit("/", 1)[0] + "/" for p in files if "/" in p}
    assert sorted(listed) == sorted(list(files) + list(dirs))
    for name, data in files.items():
        assert _mcopy(path, name) == data, name
    assert read_all(image) == files


def test_fat16_boot_tree_is_clean_and_mtools_agree(tmp_path: Path) -> None:
    files = boot_tree()
    image = build_fat(files, epoch=EPOCH)
    volume = read_fat(image)
    assert volume.fat_type == 16
    assert volume.boot.label == "BOOT"
    assert "FAT16" in volume.describe() and "too few for FAT32" in volume.describe()
    # Size follows the contents: data + a small margin, not FAT32's 33 MB minimum.
    assert len(image) < sum(map(len, files.values())) * 1.02 + 200_000
    _check_with_tools(tmp_path, image, files)


def test_fat32_forced_is_clean_and_mtools_agree(tmp_path: Path) -> None:
    files = boot_tree()
    image = build_fat(files, epoch=EPOCH, fat_type=32, num_fats=2)
    volume = read_fat(image)
    assert volume.fat_type == 32 and volume.boot.clusters >= 65525
    free, _ = parse_fsinfo(image[512:1024])
    assert free == volume.free_clusters
    assert image[6 * 512:7 * 512] == image[:512]  # backup boot sector
    _check_with_tools(tmp_path, image, files)


def test_auto_switches_to_fat32_when_the_contents_need_it(tmp_path: Path) -> None:
    files = {"kernel_2712.img": b"\x5a" * 10_000_000, "initramfs_2712": b"\xa5" * 24_000_000,
             "config.txt": b"x\n"}
    image = build_fat(files, epoch=EPOCH)
    volume = read_fat(image)
    assert volume.fat_type == 32
    assert "FAT32's minimum" in volume.describe()
    _check_with_tools(tmp_path, image, files)


def test_short_names_without_lfn_long_names_with(tmp_path: Path) -> None:
    image = build_fat(boot_tree(), epoch=EPOCH)
    volume = read_fat(image)
    root_offset = (volume.boot.reserved_sectors + volume.boot.fat_sectors) * 512
    root = image[root_offset:root_offset + volume.boot.root_entries * 32]
    entries = [root[i:i + 32] for i in range(0, len(root), 32) if root[i] != 0]
    names = [e[:11] for e in entries if e[11] != 0x0F]
    lfn_count = sum(1 for e in entries if e[11] == 0x0F)
    assert b"CONFIG  TXT" in names and b"CMDLINE TXT" in names and b"OVERLAYS   " in names
    assert b"EMPTY   TXT" in names
    # Long names: kernel_2712.img (2), initramfs_2712 (2), the two DTBs (2 each), Mixed.Case (1).
    assert lfn_count == 2 + 2 + 2 + 2 + 1
    config = next(e for e in entries if e[:11] == b"CONFIG  TXT")
    assert config[12] == fatnames.CASE_LOWER_BASE | fatnames.CASE_LOWER_EXT
    # Sorted entries: label first, then the children in name order.
    assert entries[0][11] == 0x08 and entries[0][:11] == b"BOOT       "
    assert [e.path for e in volume.entries if "/" not in e.path] == sorted(
        [p for p in boot_tree() if "/" not in p] + ["overlays"])


def test_directory_order_and_timestamps() -> None:
    files = {"b.txt": b"b", "a.txt": b"a", "dir/z": b"z", "dir/y": b"y", "C.TXT": b"c"}
    volume = read_fat(build_fat(files, epoch=EPOCH + 1))
    assert [e.path for e in volume.entries] == ["C.TXT", "a.txt", "b.txt", "dir", "dir/y",
                                                "dir/z"]
    assert {e.mtime for e in volume.entries} == {EPOCH}  # odd second rounded down
    old = read_fat(build_fat(files, epoch=0))
    assert {e.mtime for e in old.entries} == {fatnames.DOS_EPOCH}  # clamped to 1980


def test_deterministic_and_epoch_sensitive() -> None:
    files = boot_tree()
    assert build_fat(files, epoch=EPOCH) == build_fat(dict(reversed(files.items())), epoch=EPOCH)
    assert build_fat(files, epoch=EPOCH) != build_fat(files, epoch=EPOCH + 2)


@pytest.mark.parametrize("files, message", [
    ({"a.txt": b"1", "A.TXT": b"2"}, "ignore case"),
    ({"a": b"1", "a/b": b"2"}, "both a file and a directory"),
    ({"bad:name": b""}, "forbids"),
    ({"dir//x": b""}, "invalid file name"),
    ({"trailing.": b""}, "ends with a dot"),
    ({"x" * 256: b""}, "longer than 255"),
])
def test_bad_names_are_format_errors(files: dict[str, bytes], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        build_fat(files, epoch=EPOCH)


def test_over_the_limit_lists_the_largest_files() -> None:
    files = {"big.bin": b"\0" * 3_000_000, "mid.bin": b"\0" * 2_000_000, "small": b"s"}
    with pytest.raises(BuildError) as info:
        build_fat(files, epoch=EPOCH, max_bytes=4_000_000)
    assert "over the 4000000 bytes" in info.value.what
    assert info.value.hint is not None
    assert info.value.hint.startswith("largest files: big.bin (3.0 MB), mid.bin (2.0 MB)")


def test_fixed_size_volume_too_small() -> None:
    with pytest.raises(BuildError, match="too small for FAT32"):
        build_fat({"a": b"a"}, epoch=EPOCH, fat_type=32, total_sectors=40_000)
    with pytest.raises(BuildError, match="need"):
        build_fat({"a": b"a" * 40_000_000}, epoch=EPOCH, fat_type=32, total_sectors=70_000)


@pytest.mark.parametrize("bits, kib", [("16", "16384"), ("32", "40000")])
def test_reader_reads_a_volume_made_by_mkfs_and_mcopy(tmp_path: Path, bits: str, kib: str) -> None:
    image = tmp_path / "foreign.img"
    subprocess.run(["mkfs.fat", "-C", "-F", bits, "-n", "FOREIGN", str(image), kib], check=True,
                   capture_output=True)
    files = {"Long File Name.text": _blob("a", 5000), "short.txt": b"hello\n",
             "sub/dir name/deep.bin": _blob("b", 70_000), "UPPER.TXT": b"U"}
    subprocess.run(["mmd", "-i", str(image), "::sub", "::sub/dir name"], check=True)
    for name, data in files.items():
        source = tmp_path / "src"
        source.write_bytes(data)
        subprocess.run(["mcopy", "-i", str(image), str(source), f"::{name}"], check=True)
    volume = read_fat(image.read_bytes())
    assert volume.boot.label == "FOREIGN" and volume.fat_type == int(bits)
    assert volume.files() == files
    assert read_file(image.read_bytes(), "SUB/DIR NAME/DEEP.BIN") == files["sub/dir name/deep.bin"]


def test_reader_rejects_garbage_and_truncation() -> None:
    image = build_fat({"a.txt": b"a" * 5000}, epoch=EPOCH)
    with pytest.raises(FormatError, match="0x55AA"):
        read_fat(b"\0" * 4096)
    with pytest.raises(FormatError, match="truncated"):
        read_fat(image[: len(image) // 2])
    with pytest.raises(FormatError, match="no such file"):
        read_fat(image).read("missing.txt")
    volume = read_fat(image)
    entry = volume.find("a.txt")
    broken = bytearray(image)
    fat = volume.boot.reserved_sectors * 512
    struct.pack_into("<H", broken, fat + 2 * entry.first_cluster, 0)  # free cluster mid-chain
    with pytest.raises(FormatError, match="free or bad"):
        read_fat(bytes(broken)).read("a.txt")


def test_boot_sector_pack_parse_round_trip() -> None:
    for bs in (BootSector(16, 4, 1, 2, 512, 70_000, 70, 0, 0x1234ABCD, "X Y"),
               BootSector(32, 1, 32, 2, 0, 131_072, 1010, 2048, 0xDEADBEEF, "RECOVERY", 2, 1, 6)):
        assert parse_boot_sector(pack_boot_sector(bs)) == bs


_NAME_CHARS = st.sampled_from(list("abcXYZ019_-~!. +é"))
_names = st.text(_NAME_CHARS, min_size=1, max_size=20).filter(
    lambda n: n.strip() == n and not n.endswith(".") and n not in (".", ".."))


@st.composite
def _trees(draw: st.DrawFn) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    seen: set[str] = set()
    dirs = draw(st.lists(_names, max_size=3))
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.sampled_from(["", *dirs]))
        name = draw(_names)
        path = f"{parent}/{name}" if parent else name
        upper = path.upper()
        # A FAT tree: no case-insensitive duplicates, no path both file and directory.
        prefixes = {"/".join(upper.split("/")[:i]) for i in range(1, upper.count("/") + 1)}
        if upper in seen or any(p in seen for p in prefixes) or any(
                s.startswith(upper + "/") for s in seen):
            continue
        seen.add(upper)
        seen.update(f"{p}/" for p in prefixes)
        files[path] = draw(st.binary(max_size=3000))
    return files


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees())
def test_property_round_trip(files: dict[str, bytes]) -> None:
    image = build_fat(files, epoch=EPOCH)
    volume = read_fat(image)
    assert volume.files() == files
    assert {e.path for e in volume.entries if not e.is_dir} == set(files)
    assert all(e.mtime == EPOCH for e in volume.entries)
    assert build_fat(files, epoch=EPOCH) == image


@pytest.mark.parametrize("seed", range(3))
def test_random_trees_pass_fsck(tmp_path: Path, seed: int) -> None:
    rng = hashlib.sha256(str(seed).encode()).digest()
    files = {f"d{rng[i] % 3}/file-{i:02d} name.bin" if rng[i] % 2 else f"F{i}.BIN":
             os.urandom(rng[i] * 37) for i in range(20)}
    _check_with_tools(tmp_path, build_fat(files, epoch=EPOCH), files)


GOLDEN_FILES = {"config.txt": b"kernel=k\n", "kernel_2712.img": b"K" * 1500,
                "overlays/a-b.dtbo": b"o", "Long Name.txt": b""}
# Pinned bytes: any change to the on-disk format shows here (update only on purpose,
# after fsck.fat and mtools accept the new output).
GOLDEN = {
    "auto": (2122752, "59b8c4a6fb6b6498e39616669244b5d611b2dc3c65e76082ebcfc0381e1ab3df"),
    32: (33833472, "763cae5ea24c638ce91a8ea6ab556dd21e7574097db3fadaed0295c4c75723cb"),
}
GOLDEN_LISTING = [("Long Name.txt", 0, False), ("config.txt", 9, False),
                  ("kernel_2712.img", 1500, False), ("overlays", 0, True),
                  ("overlays/a-b.dtbo", 1, False)]


@pytest.mark.parametrize("fat_type", ["auto", 32])
def test_golden_image(fat_type: str | int) -> None:
    image = build_fat(GOLDEN_FILES, epoch=EPOCH, fat_type=fat_type)  # type: ignore[arg-type]
    assert (len(image), hashlib.sha256(image).hexdigest()) == GOLDEN[fat_type]
    assert [(e.path, e.size, e.is_dir) for e in read_fat(image).entries] == GOLDEN_LISTING
