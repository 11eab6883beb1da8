"""The recovery kit: archive (reproducible tar.gz), disk image (MBR + FAT32), CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from fwbuild.errors import FormatError
from fwbuild.recovery.archive import (
    PIEEPROM_SIZE,
    fake_recovery_bin,
    is_fake_recovery_bin,
    kit_files,
    read_recovery_archive,
    recovery_archive,
)
from fwbuild.recovery.diskimage import (
    MBR_LABEL_ID,
    PARTITION_SECTORS,
    PARTITION_START,
    disk_partition,
    parse_mbr,
    read_disk_image,
    recovery_disk_image,
)
from fwbuild.sign import parse_sig

EPOCH = 1_700_000_000


def _eeprom(seed: bytes = b"eeprom") -> bytes:
    return (hashlib.sha256(seed).digest() * (PIEEPROM_SIZE // 32))[:PIEEPROM_SIZE]


def test_fake_recovery_bin_is_deterministic_and_marked() -> None:
    data = fake_recovery_bin()
    assert data == fake_recovery_bin()
    assert 100_000 < len(data) < 110_000
    assert b"NOT REAL RASPBERRY PI FIRMWARE" in data[:200] and is_fake_recovery_bin(data)
    assert not is_fake_recovery_bin(b"\x00" * 1000)


def test_archive_members_and_reproducibility() -> None:
    eeprom = _eeprom()
    data = recovery_archive(fake_recovery_bin(), eeprom, EPOCH)
    assert data == recovery_archive(fake_recovery_bin(), eeprom, EPOCH)
    assert data != recovery_archive(fake_recovery_bin(), eeprom, EPOCH + 1)
    # gzip header: magic, deflate, no flags (no file name), mtime 0.
    assert data[:4] == b"\x1f\x8b\x08\x00" and data[4:8] == b"\0\0\0\0"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["README.txt", "pieeprom.bin", "pieeprom.sig",
                                             "recovery.bin"]
        for member in members:
            assert member.isfile() and member.mtime == EPOCH and member.mode == 0o644
            assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        contents = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    assert contents["pieeprom.bin"] == eeprom
    assert contents["recovery.bin"] == fake_recovery_bin()
    sig = parse_sig(contents["pieeprom.sig"])
    assert sig.sha256 == hashlib.sha256(eeprom).hexdigest()
    assert sig.ts == EPOCH and sig.target_soc == "2712" and sig.rsa2048 is None
    readme = contents["README.txt"].decode()
    for needle in ("WIPES THE VPN CREDENTIALS", "WALT_VPN_", "FAT32", "ROOT of the card",
                   "GREEN", "blinks", "RED", "FAKE", hashlib.sha256(eeprom).hexdigest()):
        assert needle in readme, needle
    kit = read_recovery_archive(data)
    assert kit.epoch == EPOCH and kit.files == contents


def test_custom_readme_and_real_recovery_bin_has_no_fake_note() -> None:
    files = kit_files(b"\x7fREAL" * 100, _eeprom(), EPOCH)
    assert b"FAKE" not in files["README.txt"]
    assert kit_files(b"r", _eeprom(), EPOCH, readme="hello\n")["README.txt"] == b"hello\n"


@pytest.mark.parametrize("recovery_bin, eeprom, message", [
    (b"r", b"\0" * 1000, "exactly 2097152"),
    (b"r", b"\0" * (PIEEPROM_SIZE + 1), "exactly 2097152"),
    (b"", _eeprom(), "recovery.bin is empty"),
    (b"\0" * 600_000, _eeprom(), "~105 KB"),
])
def test_archive_input_errors(recovery_bin: bytes, eeprom: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        recovery_archive(recovery_bin, eeprom, EPOCH)


def _tar(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def test_read_archive_rejects_bad_archives() -> None:
    good = kit_files(fake_recovery_bin(), _eeprom(), EPOCH)
    with pytest.raises(FormatError, match="not a readable"):
        read_recovery_archive(b"garbage")
    with pytest.raises(FormatError, match="lacks pieeprom.sig"):
        read_recovery_archive(_tar({k: v for k, v in good.items() if k != "pieeprom.sig"}))
    with pytest.raises(FormatError, match="unexpected member '../x'"):
        read_recovery_archive(_tar({**good, "../x": b""}))
    with pytest.raises(FormatError, match="SHA-256 mismatch"):
        read_recovery_archive(_tar({**good, "pieeprom.bin": _eeprom(b"other")}))
    with pytest.raises(FormatError, match="not a readable"):
        read_recovery_archive(gzip.compress(b"not a tar" * 100))


def test_disk_image_layout_and_tools(tmp_path: Path) -> None:
    files = kit_files(fake_recovery_bin(), _eeprom(), EPOCH)
    image = recovery_disk_image(files, EPOCH)
    assert image == recovery_disk_image(files, EPOCH)
    assert len(image) == (PARTITION_START + PARTITION_SECTORS) * 512
    label, parts = parse_mbr(image)
    assert label == MBR_LABEL_ID and len(parts) == 1
    assert (parts[0].type, parts[0].start, parts[0].sectors) == (0x0C, 2048, PARTITION_SECTORS)
    path = tmp_path / "recovery.img"
    path.write_bytes(image)
    dump = subprocess.run(["sfdisk", "-d", str(path)], capture_output=True, text=True,
                          check=True).stdout
    assert "label: dos" in dump and "label-id: 0x0a7b5ac5" in dump
    part_lines = [line for line in dump.splitlines() if line.startswith(str(path))]
    assert part_lines == [f"{path}1 : start=        2048, size=      {PARTITION_SECTORS}, type=c"]
    listing = subprocess.run(["mdir", "-i", f"{path}@@1M", "-/", "-b", "::"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listing) == [f"::/{name}" for name in sorted(files)]
    for name, data in files.items():
        assert subprocess.run(["mcopy", "-n", "-i", f"{path}@@1M", f"::{name}", "-"],
                              capture_output=True, check=True).stdout == data
    partition = tmp_path / "partition.img"
    partition.write_bytes(disk_partition(image))
    fsck = subprocess.run(["fsck.fat", "-n", str(partition)], check=False, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    volume = read_disk_image(image)
    assert volume.fat_type == 32 and volume.boot.sectors_per_cluster == 1
    assert volume.boot.hidden_sectors == 2048 and volume.boot.num_fats == 2
    assert volume.files() == files


# --------------------------------------------------------------------------- CLI


def _write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    eeprom = tmp_path / "pieeprom.bin"
    eeprom.write_bytes(_eeprom())
    rbin = tmp_path / "recovery.bin"
    rbin.write_bytes(b"\x7fREAL recovery" * 1000)
    return eeprom, rbin


def test_cli_archive_image_write(tmp_path: Path) -> None:
    eeprom, rbin = _write_inputs(tmp_path)
    runner = CliRunner()
    out = tmp_path / "kit.tar.gz"
    result = runner.invoke(main, ["recovery", "archive", "--eeprom", str(eeprom),
                                  "--recovery-bin", str(rbin), "--epoch", str(EPOCH),
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == recovery_archive(rbin.read_bytes(), eeprom.read_bytes(), EPOCH)

    img = tmp_path / "kit.img"
    result = runner.invoke(main, ["recovery", "image", str(img), "--from", str(out)])
    assert result.exit_code == 0, result.output
    kit = read_recovery_archive(out.read_bytes())
    assert img.read_bytes() == recovery_disk_image(kit.files, EPOCH)
    assert img.stat().st_blocks * 512 < img.stat().st_size // 4  # written sparse

    img2 = tmp_path / "kit2.img"
    result = runner.invoke(main, ["recovery", "image", str(img2), "--eeprom", str(eeprom),
                                  "--recovery-bin", str(rbin), "--epoch", str(EPOCH)])
    assert result.exit_code == 0 and img2.read_bytes() == img.read_bytes()

    card = tmp_path / "card.img"
    result = runner.invoke(main, ["recovery", "write", str(card), "--from", str(out)],
                           input="y\n")
    assert result.exit_code == 0, result.output
    assert "a regular file" in result.output and "verified" in result.output
    assert card.read_bytes() == img.read_bytes()


def test_cli_virtual_archive_says_so(tmp_path: Path) -> None:
    eeprom, _ = _write_inputs(tmp_path)
    result = CliRunner().invoke(main, ["recovery", "archive", "--eeprom", str(eeprom),
                                       "--virtual", "--out", str(tmp_path / "v.tar.gz")])
    assert result.exit_code == 0, result.output
    assert "FAKE recovery.bin" in result.output
    kit = read_recovery_archive((tmp_path / "v.tar.gz").read_bytes())
    assert is_fake_recovery_bin(kit.files["recovery.bin"])


def test_cli_write_declined_writes_nothing(tmp_path: Path) -> None:
    eeprom, rbin = _write_inputs(tmp_path)
    card = tmp_path / "card.img"
    result = CliRunner().invoke(main, ["recovery", "write", str(card), "--eeprom", str(eeprom),
                                       "--recovery-bin", str(rbin)], input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert not card.exists()


@pytest.mark.parametrize("case, code", [
    ("no-recovery-bin", 2), ("both", 2), ("bad-eeprom", 1), ("bad-archive", 1), ("from-and-eeprom", 2),
])
def test_cli_errors_are_one_line(tmp_path: Path, case: str, code: int) -> None:
    eeprom, rbin = _write_inputs(tmp_path)
    (tmp_path / "short.bin").write_bytes(b"\0" * 100)
    (tmp_path / "bad.tar.gz").write_bytes(b"junk")
    out = ["--out", str(tmp_path / "o.tar.gz")]
    args = {
        "no-recovery-bin": ["recovery", "archive", "--eeprom", str(eeprom), *out],
        "both": ["recovery", "archive", "--eeprom", str(eeprom), "--recovery-bin", str(rbin),
                 "--virtual", *out],
        "bad-eeprom": ["recovery", "archive", "--eeprom", str(tmp_path / "short.bin"),
                       "--recovery-bin", str(rbin), *out],
        "bad-archive": ["recovery", "image", str(tmp_path / "x.img"), "--from",
                        str(tmp_path / "bad.tar.gz")],
        "from-and-eeprom": ["recovery", "image", str(tmp_path / "x.img"), "--from",
                            str(tmp_path / "bad.tar.gz"), "--eeprom", str(eeprom)],
    }[case]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert sum(line.startswith("Error:") for line in result.output.splitlines()) == 1
    assert not (tmp_path / "o.tar.gz").exists() and not (tmp_path / "x.img").exists()
