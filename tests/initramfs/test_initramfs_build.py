"""End-to-end initramfs builds with real Debian arm64 packages (slow: apt downloads, QEMU)."""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild.cache import Cache
from fwbuild.errors import BuildError
from fwbuild.initramfs.apt import AptSession
from fwbuild.initramfs.builder import (
    InitramfsResult,
    InitramfsSpec,
    build_initramfs,
    stage_kernel,
    stage_packages,
    write_initramfs,
)
from fwbuild.initramfs.cpio import CpioEntry, decompress, read_cpio
from fwbuild.initramfs.elf import DEFAULT_LIBRARY_DIRS, elf_needed, resolve_elf_closure

pytestmark = pytest.mark.slow

EPOCH = 1700000000
KERNEL = "linux-image-cloud-arm64"
SPEC = InitramfsSpec(
    packages=("busybox-static", "openssh-client", "sshfs"),
    paths=("/bin/busybox", "/usr/bin/ssh", "/usr/bin/sshfs", "/bin/fusermount3"),
    kernel_package=KERNEL,
    modules=("virtio_pci", "virtio_net", "fuse", "tun", "overlay", "qemu_fw_cfg", "af_packet"),
    epoch=EPOCH,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return Cache(tmp_path_factory.getbasetemp() / "fwbuild-cache")  # the conftest's session cache


@pytest.fixture(scope="module")
def built(cache: Cache) -> InitramfsResult:
    return build_initramfs(SPEC, cache)


def _archive(result: InitramfsResult) -> dict[str, CpioEntry]:
    return {"/" + e.name: e for e in read_cpio(decompress(result.data))}


def _resolve(files: dict[str, CpioEntry], path: str) -> str | None:
    """Follow symlinks inside the archive (chroot semantics); None when missing."""
    for _ in range(40):
        parts = [p for p in path.split("/") if p]
        current = ""
        for index, part in enumerate(parts):
            candidate = f"{current}/{part}"
            entry = files.get(candidate)
            if entry is None:
                return None
            if entry.kind == "l":
                target = entry.link_target
                base = target if target.startswith("/") else posixpath.join(current or "/", target)
                path = posixpath.normpath("/".join([base, *parts[index + 1:]]))
                break
            current = candidate
        else:
            return current
    return None


def test_every_needed_library_resolves_inside_the_archive(built: InitramfsResult) -> None:
    files = _archive(built)
    checked = 0
    for name, entry in sorted(files.items()):
        if entry.kind != "-" or not entry.data:
            continue
        facts = elf_needed(entry.data)
        if facts is None or name.startswith("/lib/modules/"):
            continue
        interp, needed = facts
        checked += 1
        if interp:
            assert _resolve(files, interp), f"{name}: interpreter {interp} missing"
        for lib in needed:
            found = [d for d in DEFAULT_LIBRARY_DIRS if _resolve(files, f"{d}/{lib}")]
            assert found, f"{name} needs {lib}, not in the archive"
    assert checked >= 10  # busybox, ssh, sshfs, fusermount3, ld.so, libc and friends
    for wanted in ("/bin/busybox", "/usr/bin/ssh", "/usr/bin/sshfs", "/init", "/dev/console",
                   "/lib/ld-linux-aarch64.so.1", "/usr/lib/aarch64-linux-gnu/libcrypto.so.3"):
        assert wanted in files
    console = files["/dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdevmajor, console.rdevminor) == (5, 1)
    assert all(e.uid == 0 and e.gid == 0 and e.mtime <= EPOCH for e in files.values())
    # modules: stored uncompressed, modules.dep matches, built-ins reported
    assert built.builtin_modules == ("af_packet",)
    version = built.kernel_version
    dep = files[f"/lib/modules/{version}/modules.dep"].data.decode()
    for line in dep.splitlines():
        for module in line.replace(":", " ").split():
            assert f"/lib/modules/{version}/{module}" in files
    assert "kernel/drivers/net/virtio_net.ko:" in dep
    assert [p["name"] for p in built.provenance_document()["packages"]].count("libssl3") == 1


def test_removed_library_is_reported_with_the_binary(cache: Cache) -> None:
    tree, _ = stage_packages(AptSession(cache), cache, SPEC.packages)
    del tree.nodes["usr/lib/aarch64-linux-gnu/libcrypto.so.3"]
    with pytest.raises(BuildError) as info:
        resolve_elf_closure(tree, [("/usr/bin/ssh", ("requested",))])
    error = info.value
    assert "/usr/bin/ssh needs libcrypto.so.3" in error.what
    assert error.where is not None and "openssh-client" in error.where
    assert error.hint is not None and "/usr/lib/aarch64-linux-gnu/libcrypto.so.3" in error.hint


def test_building_twice_gives_identical_bytes(cache: Cache, built: InitramfsResult,
                                              tmp_path: Path) -> None:
    extra = tmp_path / "motd"
    extra.write_text("welcome\n")
    spec = replace(SPEC, files={"/etc/motd": str(extra)}, compression="gzip")
    first = build_initramfs(spec, cache)
    # new mtimes on every staged file and on the extra file, and no compression memo
    later = EPOCH + 10**6
    for root, _dirs, names in os.walk(cache.root / "staged"):
        for name in names:
            os.utime(os.path.join(root, name), (later, later))
    os.utime(extra, (later, later))
    shutil.rmtree(cache.root / "compressed", ignore_errors=True)
    second = build_initramfs(spec, cache)
    assert second.data == first.data
    assert build_initramfs(SPEC, cache).data == built.data  # zstd, compressed again
    assert first.data[4:8] == b"\0\0\0\0"  # gzip mtime


def test_boots_in_qemu_to_the_shell_marker(cache: Cache, built: InitramfsResult, tmp_path: Path) -> None:
    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("qemu-system-aarch64 not installed")
    from fwbuild.virtual.qemu import QemuConfig, UserNet, run_qemu

    kernel = stage_kernel(KERNEL, cache)
    assert kernel.version == built.kernel_version
    assert kernel.image.name == f"vmlinuz-{kernel.version}" and kernel.modules_dir.is_dir()
    initrd = tmp_path / "initramfs_2712"
    write_initramfs(built, initrd)
    config = QemuConfig(kernel=kernel.image, initrd=initrd, net=UserNet(),
                        append="console=ttyAMA0 panic=-1 fwbuild.poweroff")
    result = run_qemu(config, tmp_path / "console.log", marker=r"FWBUILD-INITRAMFS-POWEROFF",
                      timeout=600, stop_on_marker=False)
    assert result.matched, result.console[-3000:]
    assert f"FWBUILD-INITRAMFS-SHELL kernel={kernel.version} modules=" in result.console
    assert "cannot load module" not in result.console, result.console[-3000:]
    assert "eth0" in result.console.split("network interfaces:")[1].splitlines()[0]
    assert result.exit_status == 0 and not result.timed_out


def test_cli_build_list_why(cache: Cache, built: InitramfsResult, tmp_path: Path) -> None:
    from fwbuild.cli import main

    out = tmp_path / "initrd"
    runner = CliRunner()
    args = ["initramfs", "build", "--out", str(out), "--kernel-package", KERNEL]
    for package in SPEC.packages:
        args += ["--package", package]
    for path in SPEC.paths:
        args += ["--binary", path]
    for module in SPEC.modules:
        args += ["--module", module]
    env = {"FWBUILD_CACHE": str(cache.root), "SOURCE_DATE_EPOCH": str(EPOCH)}
    result = runner.invoke(main, args, env=env)
    assert result.exit_code == 0, result.output
    assert "built into the kernel (not copied): af_packet" in result.output
    assert out.read_bytes() == built.data
    listing = runner.invoke(main, ["initramfs", "list", str(out)])
    assert listing.exit_code == 0
    assert "crw-------   1 0    0       5,   1 2023-11-14 22:13 UTC /dev/console" in listing.output
    assert "/lib/ld-linux-aarch64.so.1 -> aarch64-linux-gnu/ld-linux-aarch64.so.1" in listing.output
    why = runner.invoke(main, ["initramfs", "why", str(out), "/usr/lib/aarch64-linux-gnu/libcrypto.so.3"])
    assert why.exit_code == 0
    assert "needed by /usr/bin/ssh" in why.output
    assert "package libssl3 (dependency chain: openssh-client -> libssl3)" in why.output
    missing = runner.invoke(main, ["initramfs", "why", str(out), "/usr/bin/sssh"])
    assert missing.exit_code == 2 and "did you mean /usr/bin/ssh" in missing.output
