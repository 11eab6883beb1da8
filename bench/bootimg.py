"""Cost of the boot image and the recovery kit: build, sign, read back, disk image, card write.

Usage: python3 bench/bootimg.py [--repeat N]
Prints wall times (median of N) and sizes; compares with mkfs.fat + mcopy when present.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric import rsa

from fwbuild.bootimg.bootimg import boot_files, build_boot_image, sign_boot_image
from fwbuild.bootimg.fat import read_fat
from fwbuild.recovery.archive import fake_recovery_bin, kit_files, pack_tar_gz
from fwbuild.recovery.device import write_kit
from fwbuild.recovery.diskimage import recovery_disk_image

EPOCH = 1_760_000_000


def blob(seed: str, size: int) -> bytes:
    block = b"".join(hashlib.sha256(f"{seed}{i}".encode()).digest() for i in range(2048))
    return (block * (size // len(block) + 1))[:size]


def timed(repeat: int, func: Callable[[], object]) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    dtbs = {f"bcm2712{v}-rpi-5-b.dtb": blob(v, 80_000) for v in ("", "d0")}
    for label, kernel_mb, initramfs_mb in (("small", 9, 6), ("typical", 9, 20), ("large", 9, 60)):
        files = boot_files(blob("k", kernel_mb * 10**6), blob("i", initramfs_mb * 10**6), dtbs,
                           "console=ttyAMA10", [], {})
        image = build_boot_image(files, EPOCH)
        seconds, _ = timed(args.repeat, partial(build_boot_image, files, EPOCH))
        sign_s, _ = timed(args.repeat, partial(sign_boot_image, image, key, EPOCH))
        read_s, _ = timed(args.repeat, lambda: read_fat(image).files())  # noqa: B023
        kind = read_fat(image).describe().split(" (")[0]
        content = sum(map(len, files.values()))
        print(f"boot.img {label:8} {content / 1e6:6.1f} MB content -> {len(image) / 1e6:6.1f} MB "
              f"{kind}: build {seconds * 1000:7.1f} ms, sign {sign_s * 1000:6.1f} ms, "
              f"read all {read_s * 1000:6.1f} ms")
        if shutil.which("mkfs.fat") and shutil.which("mcopy") and label == "typical":
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "src"
                src.mkdir()
                for name, data in files.items():
                    (src / name).write_bytes(data)
                img = Path(tmp) / "boot.img"
                start = time.perf_counter()
                kib = (len(image) + 1023) // 1024
                subprocess.run(["mkfs.fat", "-C", "-f", "1", "-n", "BOOT", "-S", "512", "-r",
                                "256", str(img), str(kib)], check=True, capture_output=True)
                subprocess.run(["mcopy", "-i", str(img), *map(str, sorted(src.iterdir())),
                                "::"], check=True)
                print(f"  reference mkfs.fat + mcopy of the same files: "
                      f"{(time.perf_counter() - start) * 1000:7.1f} ms")
    eeprom = blob("eeprom", 2 * 1024 * 1024)
    kit = kit_files(fake_recovery_bin(), eeprom, EPOCH)
    tar_s, tar = timed(args.repeat, lambda: pack_tar_gz(kit, EPOCH))
    assert isinstance(tar, bytes)
    disk_s, disk = timed(args.repeat, lambda: recovery_disk_image(kit, EPOCH))
    assert isinstance(disk, bytes)
    print(f"recovery tar.gz: {len(tar)} bytes in {tar_s * 1000:.1f} ms; disk image "
          f"{len(disk) / 1e6:.1f} MB in {disk_s * 1000:.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "card.img"
        write_s, _ = timed(args.repeat, lambda: write_kit(target, disk))
        used = target.stat().st_blocks * 512
        print(f"write_kit to a file (sparse, verified): {write_s * 1000:.1f} ms, "
              f"{used / 1e6:.1f} MB allocated of {len(disk) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
