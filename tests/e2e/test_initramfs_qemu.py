"""The QEMU runner's command line and its errors (no QEMU run here: see test_initramfs_build)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fwbuild.errors import ToolError
from fwbuild.virtual import qemu
from fwbuild.virtual.qemu import QemuConfig, UserNet, qemu_command, run_qemu


def test_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    config = QemuConfig(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd",
                        append="console=ttyAMA0 quiet",
                        fw_cfg={"opt/fwbuild/bootconf": tmp_path / "bootconf.txt"},
                        net=UserNet(hostfwd=("tcp:127.0.0.1:2222-:22",),
                                    guestfwd=("tcp:10.0.2.100:22-tcp:127.0.0.1:22",),
                                    mac="52:54:00:12:34:56"),
                        drives=("file=sd.img,format=raw,if=virtio",))
    args = qemu_command(config, tmp_path / "console.log")
    assert args[:9] == ["/usr/bin/qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72",
                        "-m", "512", "-smp", "1"]
    assert "-nographic" in args and "-no-reboot" in args
    assert args[args.index("-serial") + 1] == f"file:{tmp_path / 'console.log'}"
    assert args[args.index("-append") + 1] == "console=ttyAMA0 quiet"
    assert args[args.index("-fw_cfg") + 1] == f"name=opt/fwbuild/bootconf,file={tmp_path / 'bootconf.txt'}"
    assert args[args.index("-netdev") + 1] == ("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22,"
                                               "guestfwd=tcp:10.0.2.100:22-tcp:127.0.0.1:22")
    assert args[args.index("-device") + 1] == "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:12:34:56"
    assert args[args.index("-drive") + 1] == "file=sd.img,format=raw,if=virtio"
    mmio = qemu_command(QemuConfig(kernel=tmp_path / "k", net=UserNet(device="virtio-net-device",
                                                                     restrict=False)), tmp_path / "l")
    assert mmio[mmio.index("-device") + 1] == "virtio-net-device,netdev=n0"
    assert "-initrd" not in mmio
    none = qemu_command(QemuConfig(kernel=tmp_path / "k"), tmp_path / "l")
    assert none[none.index("-nic") + 1] == "none"


def test_missing_qemu_is_a_tool_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ToolError, match="qemu-system-aarch64 not found") as info:
        qemu.ensure_qemu()
    assert info.value.hint and "qemu-system-arm" in info.value.hint


def test_missing_kernel_is_a_tool_error(tmp_path: Path) -> None:
    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("qemu-system-aarch64 not installed")
    with pytest.raises(ToolError, match="input file not found"):
        run_qemu(QemuConfig(kernel=tmp_path / "nope"), tmp_path / "console.log", timeout=5)


@pytest.mark.slow
def test_garbage_kernel_ends_with_a_timeout_not_a_hang(tmp_path: Path) -> None:
    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("qemu-system-aarch64 not installed")
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"\0" * 4096)
    result = run_qemu(QemuConfig(kernel=kernel), tmp_path / "console.log", marker="never", timeout=3)
    assert result.timed_out and result.matched is None and result.exit_status is None
