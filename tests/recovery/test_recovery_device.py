"""`recovery write`: refusals on a fake sysfs tree, writing and verifying files and 'devices'."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from fwbuild.errors import BuildError, UsageError
from fwbuild.recovery import device
from fwbuild.recovery.archive import PIEEPROM_SIZE, fake_recovery_bin, kit_files, pack_tar_gz
from fwbuild.recovery.device import SysfsProbe, describe_target, write_kit
from fwbuild.recovery.diskimage import recovery_disk_image

EPOCH = 1_700_000_000


@pytest.fixture(scope="module")
def kit() -> dict[str, bytes]:
    eeprom = (hashlib.sha256(b"e").digest() * (PIEEPROM_SIZE // 32))[:PIEEPROM_SIZE]
    return kit_files(fake_recovery_bin(), eeprom, EPOCH)


@pytest.fixture(scope="module")
def image(kit: dict[str, bytes]) -> bytes:
    return recovery_disk_image(kit, EPOCH)


def fake_system(root: Path, mounts: Sequence[str] = (), swaps: Sequence[str] = ()) -> Path:
    """A fake / with sys/block, proc/self/mounts, proc/swaps and dev/ stand-in files."""
    disks = {
        "sdz": ("1", 62_333_952, "SanDisk", "Ultra", ["sdz1", "sdz2"]),
        "sdy": ("0", 62_333_952, "ATA", "Fixed Disk", ["sdy1"]),
        "nvme0n1": ("0", 1_000_215_216, "", "Samsung SSD 980", ["nvme0n1p1", "nvme0n1p2"]),
        "mmcblk0": ("1", 100, "", "TINY", []),  # 50 KB: smaller than the image
        "dm-0": ("0", 1_000_000, "", "", []),
    }
    for name, (removable, sectors, vendor, model, parts) in disks.items():
        base = root / "sys" / "block" / name
        (base / "device").mkdir(parents=True)
        (base / "removable").write_text(removable + "\n")
        (base / "size").write_text(f"{sectors}\n")
        if vendor:
            (base / "device" / "vendor").write_text(vendor + "\n")
        (base / "device" / ("model" if not name.startswith("mmc") else "name")).write_text(model)
        for part in parts:
            (base / part).mkdir()
            (base / part / "partition").write_text(part[-1])
        (root / "dev").mkdir(exist_ok=True)
        (root / "dev" / name).write_bytes(b"old data" * 1000)
        for part in parts:
            (root / "dev" / part).write_bytes(b"")
    (root / "sys" / "block" / "dm-0" / "slaves").mkdir()
    (root / "sys" / "block" / "dm-0" / "slaves" / "sdy1").mkdir()
    (root / "proc" / "self").mkdir(parents=True)
    base_mounts = ["proc /proc proc rw 0 0", "tmpfs /run tmpfs rw 0 0"]
    (root / "proc" / "self" / "mounts").write_text("\n".join([*base_mounts, *mounts]) + "\n")
    (root / "proc" / "swaps").write_text(
        "Filename Type Size Used Priority\n" + "".join(f"{s} partition 1 0 -2\n" for s in swaps))
    return root


ROOT_ON_NVME = "/dev/nvme0n1p2 / ext4 rw 0 0"


def test_write_to_a_removable_card_verifies(tmp_path: Path, image: bytes,
                                            kit: dict[str, bytes]) -> None:
    root = fake_system(tmp_path, [ROOT_ON_NVME])
    probe = SysfsProbe(root)
    card = root / "dev" / "sdz"
    info = describe_target(card, probe)
    text = info.describe()
    assert info.block_device == "sdz" and info.partitions == ("sdz1", "sdz2")
    assert "SanDisk Ultra" in text and "31.9 GB" in text and "sdz1, sdz2" in text
    assert "ERASED" in text
    seen: list[tuple[str, int, int | None]] = []
    report = write_kit(card, image, lambda *a: seen.append(a), probe)
    assert card.read_bytes() == image
    assert report.block_device == "sdz" and report.bytes_written == len(image)
    assert report.files == {k: hashlib.sha256(v).hexdigest() for k, v in kit.items()}
    assert seen[-1][0] == "verify" and seen[-1][1] == len(image)
    assert any(label == "write" and done == len(image) for label, done, _ in seen)


@pytest.mark.parametrize("target, mounts, swaps, message", [
    ("sdz", ["/dev/sdz1 /media/card vfat rw 0 0", ROOT_ON_NVME], [], "sdz1 on /media/card"),
    ("sdz", [ROOT_ON_NVME], ["/dev/sdz2"], r"sdz2 on \[swap\]"),
    ("sdy", [ROOT_ON_NVME], [], "is not a removable disk"),
    ("nvme0n1", [ROOT_ON_NVME], [], "holds the running system"),
    ("sdy", ["/dev/dm-0 / ext4 rw 0 0"], [], "holds the running system"),  # LVM/LUKS on sdy1
    ("sdz1", [ROOT_ON_NVME], [], "is a partition of sdz"),
])
def test_refusals(tmp_path: Path, image: bytes, target: str, mounts: list[str],
                  swaps: list[str], message: str) -> None:
    root = fake_system(tmp_path, mounts, swaps)
    before = (root / "dev" / target).read_bytes()
    with pytest.raises(UsageError, match=message):
        write_kit(root / "dev" / target, image, probe=SysfsProbe(root))
    assert (root / "dev" / target).read_bytes() == before


def test_non_removable_can_be_allowed_and_small_card_refused(tmp_path: Path,
                                                             image: bytes) -> None:
    root = fake_system(tmp_path, [ROOT_ON_NVME])
    probe = SysfsProbe(root)
    write_kit(root / "dev" / "sdy", image, probe=probe, allow_non_removable=True)
    assert (root / "dev" / "sdy").read_bytes() == image
    with pytest.raises(UsageError, match="holds 51200 bytes"):
        write_kit(root / "dev" / "mmcblk0", image, probe=probe)


def test_regular_file_is_written_sparse_and_atomically(tmp_path: Path, image: bytes,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "card.img"
    report = write_kit(target, image)
    assert report.block_device is None and target.read_bytes() == image
    assert target.stat().st_blocks * 512 < len(image) // 4

    original = device._read_back

    def faulty(path: Path, size: int, progress: object) -> bytes:
        data = bytearray(original(path, size, None))
        offset = data.find(b"NOT REAL RASPBERRY PI FIRMWARE")
        data[offset] ^= 0xFF  # a bit flips inside recovery.bin on the "card"
        return bytes(data)

    monkeypatch.setattr(device, "_read_back", faulty)
    target.write_bytes(b"previous")
    with pytest.raises(BuildError, match="verification failed: recovery.bin differ"):
        write_kit(target, image)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in target.parent.iterdir()) == ["card.img"]


def test_directory_target_and_live_probe(tmp_path: Path, image: bytes) -> None:
    with pytest.raises(UsageError, match="directory"):
        write_kit(tmp_path, image)
    live = SysfsProbe()
    assert live.device_name(tmp_path / "nothing") is None
    assert isinstance(live.mounted(), list)
    live.root_device()  # must not fail, whatever the host's root is


def test_cli_write_on_fake_devices(tmp_path: Path, kit: dict[str, bytes], image: bytes) -> None:
    root = fake_system(tmp_path / "root", ["/dev/sdz1 /media/card vfat rw 0 0", ROOT_ON_NVME])
    archive = tmp_path / "kit.tar.gz"
    archive.write_bytes(pack_tar_gz(kit, EPOCH))
    runner = CliRunner()
    common = ["--from", str(archive), "--system-root", str(root)]
    refused = runner.invoke(main, ["recovery", "write", str(root / "dev" / "sdz"), *common])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    errors = [line for line in refused.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "sdz is in use: sdz1 on /media/card" in errors[0]
    assert "Hint: unmount it first" in refused.output

    (root / "proc" / "self" / "mounts").write_text(ROOT_ON_NVME + "\n")
    done = runner.invoke(main, ["recovery", "write", str(root / "dev" / "sdz"), *common, "--yes"])
    assert done.exit_code == 0, done.output
    assert "SanDisk Ultra" in done.output and "ERASED" in done.output
    assert done.output.count("verified  ") == 4
    assert (root / "dev" / "sdz").read_bytes() == image


@pytest.mark.parametrize("kind", ["fifo", "chardev", "missing-dev"])
def test_refuses_targets_that_are_neither_disks_nor_files(tmp_path: Path, kind: str) -> None:
    from fwbuild.errors import UsageError
    from fwbuild.recovery.device import describe_target

    if kind == "fifo":
        target = tmp_path / "fifo"
        os.mkfifo(target)
    elif kind == "chardev":
        target = Path("/dev/null")
    else:
        target = Path("/dev/fwbuild-no-such-card")
    with pytest.raises(UsageError):
        describe_target(target)
    assert Path("/dev/null").exists() and not Path("/dev/fwbuild-no-such-card").exists()
