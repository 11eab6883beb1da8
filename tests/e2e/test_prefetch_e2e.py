"""End to end: a reference boot records the working set of a root image, a boot at 50 ms
added RTT (the network model between QEMU and the sshd) prefetches it and reaches the
root's marker. The tiny busybox root keeps this short; bench/vpnboot.py does the same
with the Debian root."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from fwbuild.virtual.netmodel import PROFILES
from fwbuild.virtual.refboot import boot_image, record_working_set
from fwbuild.virtual.rootfs import BOOT_MARKER, MARKER, build_root_image, build_tiny_root
from fwbuild.virtual.vpnboot import vpn_initramfs_spec
from fwbuild.virtual.workingset import BLOCK, publish_working_set, set_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the test sshd needs root"),
    pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None, reason="no qemu-system-aarch64"),
]

KERNEL_PACKAGE = "linux-image-cloud-arm64"


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path
    image: Path


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    from fwbuild.cache import Cache
    from fwbuild.initramfs.builder import build_initramfs, stage_kernel

    cache = Cache(tmp_path_factory.getbasetemp() / "fwbuild-cache")
    work = tmp_path_factory.mktemp("prefetch")
    kernel = stage_kernel(KERNEL_PACKAGE, cache)
    initrd = work / "initramfs"
    initrd.write_bytes(build_initramfs(vpn_initramfs_spec(KERNEL_PACKAGE), cache).data)
    root = build_tiny_root(work / "root", cache)
    (work / "export").mkdir()
    return Guest(kernel.image, initrd, build_root_image(root, work / "export" / "root.img"))


def blocks_of(reads: tuple[tuple[int, int], ...]) -> set[int]:
    return {b for offset, length in reads for b in range(offset // BLOCK, (offset + length - 1) // BLOCK + 1)}


def test_prefetch_at_50ms_reaches_the_marker(tmp_path: Path, guest: Guest) -> None:
    ws, reference = record_working_set(tmp_path / "reference", guest.image, guest.kernel, guest.initrd,
                                       marker=MARKER, init_line=BOOT_MARKER)
    assert reference.prefetch_line == "walt-vpn: prefetch: no working set for this root: normal boot"
    assert ws.ranges and ws.blocks * BLOCK < guest.image.stat().st_size
    assert publish_working_set(ws, guest.image) == set_path(guest.image)

    run = boot_image(tmp_path / "prefetch", guest.image, guest.kernel, guest.initrd, PROFILES["50ms"],
                     marker=MARKER, init_line=BOOT_MARKER)
    assert run.prefetch_line.startswith(f"walt-vpn: prefetch: {len(ws.ranges)} ranges, "), run.prefetch_line
    # Everything the reference boot read was fetched (ahead) by this boot.
    wanted = {b for start, count in ws.ranges for b in range(start, start + count)}
    assert wanted <= blocks_of(run.reads)
