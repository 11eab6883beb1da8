"""End to end with the Debian root (what users boot): `fwbuild rootfs prefetch` records the
working set of the image by a reference boot of the virtual node and publishes it; a boot
at 50 ms added RTT (the network model between QEMU and the sshd) prefetches it and reaches
multi-user.target (the root's marker unit). The Debian root comes from the session's test
cache, shared with tests/test_rootfs_debian.py (built once per run); the two boots add
about two minutes to the suite on an idle 2-core machine. bench/vpnboot.py measures the
same boots on every network profile."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from fwbuild.rootfs.debian import MARKER, ROOT_INIT_LINE
from fwbuild.virtual.netmodel import PROFILES
from fwbuild.virtual.refboot import boot_image
from fwbuild.virtual.vpnboot import vpn_initramfs_spec
from fwbuild.virtual.workingset import BLOCK, load_working_set, set_path

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
    cache: Path


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    from fwbuild.cache import Cache
    from fwbuild.initramfs.builder import build_initramfs, stage_kernel
    from fwbuild.rootfs.debian import build_debian_root

    cache = Cache(tmp_path_factory.getbasetemp() / "fwbuild-cache")
    work = tmp_path_factory.mktemp("prefetch")
    kernel = stage_kernel(KERNEL_PACKAGE, cache)
    initrd = work / "initramfs"
    initrd.write_bytes(build_initramfs(vpn_initramfs_spec(KERNEL_PACKAGE), cache).data)
    root = build_debian_root(cache)
    export = work / "export"
    export.mkdir()
    os.chmod(work, 0o755)
    os.chmod(export, 0o755)
    image = export / "root.img"
    os.link(root.image, image)          # the cached image stays untouched (no set beside it)
    return Guest(kernel.image, initrd, image, cache.root)


def blocks_of(reads: tuple[tuple[int, int], ...]) -> set[int]:
    return {b for offset, length in reads for b in range(offset // BLOCK, (offset + length - 1) // BLOCK + 1)}


def test_debian_prefetch_at_50ms_reaches_multi_user(tmp_path: Path, guest: Guest,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FWBUILD_CACHE", str(guest.cache))   # the CLI stages the same kernel
    result = CliRunner().invoke(main, ["rootfs", "prefetch", str(guest.image),
                                       "--initramfs", str(guest.initrd), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["set"] == str(set_path(guest.image)) and info["ranges"] > 0
    ws = load_working_set(guest.image)
    assert ws is not None and len(ws.ranges) == info["ranges"]
    assert 0 < ws.blocks * BLOCK == info["bytes"] < guest.image.stat().st_size
    starts = [start for start, _ in ws.ranges]
    assert starts == sorted(starts)

    run = boot_image(tmp_path / "prefetch", guest.image, guest.kernel, guest.initrd, PROFILES["50ms"],
                     marker=MARKER, init_line=ROOT_INIT_LINE)
    assert run.prefetch_line.startswith(f"walt-vpn: prefetch: {len(ws.ranges)} ranges, "), run.prefetch_line
    # Everything the reference boot read was fetched (ahead) by this boot.
    wanted = {b for start, count in ws.ranges for b in range(start, start + count)}
    assert wanted <= blocks_of(run.reads)
    console = run.console.read_text(errors="replace")
    # The root's FUSE connection was tuned (no "cannot tune" line), the tunnel came up while
    # the prefetch ran, and the path carried the SFTP payload zlib-compressed (SSH compression).
    assert "cannot tune" not in console
    assert console.index("walt-vpn: prefetch: ") < console.index("tunnel: interface walt-vpn is up") \
        < console.index("root: mounted image")
    assert run.relay_down < run.sftp.total_bytes * 0.6, (run.relay_down, run.sftp.total_bytes)
