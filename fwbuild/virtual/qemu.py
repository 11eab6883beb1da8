"""A small runner for `qemu-system-aarch64 -M virt` (TCG): the virtual Pi 5's machine.

Usage::

    config = QemuConfig(kernel=vmlinuz, initrd=initramfs, append="console=ttyAMA0",
                        fw_cfg={"opt/fwbuild/bootconf": bootconf_path},
                        net=UserNet(hostfwd=("tcp:127.0.0.1:2222-:22",)))
    result = run_qemu(config, log=tmp / "console.log", marker=r"FWBUILD-INITRAMFS-SHELL",
                      timeout=300)
    assert result.matched

or, to interact while it runs::

    with start_qemu(config, log) as vm:
        vm.wait_for(r"login:", timeout=120)
        ...                     # talk to it through the forwarded ports
    # leaving the block stops QEMU (SIGTERM, then SIGKILL)

The serial console is written to `log` (a file, so a test failure can show
it); `QemuProcess.console()` reads it. `-no-reboot` makes a guest reboot or
panic (`panic=-1`) end QEMU; a guest `poweroff` ends it with status 0.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from ..errors import ToolError

QEMU = "qemu-system-aarch64"


@dataclass(frozen=True)
class UserNet:
    """QEMU user-mode networking (`-netdev user`): no root, no host interface.

    `hostfwd`: e.g. "tcp:127.0.0.1:2222-:22"; `guestfwd`: e.g.
    "tcp:10.0.2.100:22-cmd:nc 127.0.0.1 22" or "tcp:10.0.2.100:22-tcp:127.0.0.1:2222";
    `restrict`: isolate the guest from the host's networks (forwards still work).
    `device`: "virtio-net-pci" or "virtio-net-device" (virtio-mmio).
    """

    hostfwd: tuple[str, ...] = ()
    guestfwd: tuple[str, ...] = ()
    restrict: bool = True
    device: str = "virtio-net-pci"
    mac: str | None = None

    def args(self, netdev_id: str = "n0") -> list[str]:
        netdev = f"user,id={netdev_id}"
        if self.restrict:
            netdev += ",restrict=on"
        netdev += "".join(f",hostfwd={fwd}" for fwd in self.hostfwd)
        netdev += "".join(f",guestfwd={fwd}" for fwd in self.guestfwd)
        device = f"{self.device},netdev={netdev_id}"
        if self.device.endswith("-pci"):
            device += ",romfile="  # no option ROM: we boot the kernel directly (no ipxe-qemu needed)
        if self.mac:
            device += f",mac={self.mac}"
        return ["-netdev", netdev, "-device", device]


@dataclass(frozen=True)
class QemuConfig:
    kernel: Path
    initrd: Path | None = None
    append: str = "console=ttyAMA0"
    memory_mb: int = 512
    cpu: str = "cortex-a72"
    smp: int = 1
    fw_cfg: Mapping[str, Path] = field(default_factory=dict)  # name -> host file
    net: UserNet | None = None
    drives: tuple[str, ...] = ()        # full `-drive` values, e.g. "file=sd.img,format=raw,if=virtio"
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class QemuResult:
    console: str
    exit_status: int | None     # None: QEMU was stopped by us (marker seen or timeout)
    matched: str | None         # the text the marker matched, if it did
    timed_out: bool


def qemu_binary() -> str:
    exe = shutil.which(QEMU)
    if exe is None:
        raise ToolError(f"{QEMU} not found", hint="install the qemu-system-arm package")
    return exe


def qemu_command(config: QemuConfig, log: Path) -> list[str]:
    """The full command line (useful in error messages and for reproducing by hand)."""
    args = [qemu_binary(), "-M", "virt", "-cpu", config.cpu, "-m", str(config.memory_mb),
            "-smp", str(config.smp), "-nographic", "-monitor", "none",
            "-serial", f"file:{log}", "-no-reboot",
            "-kernel", str(config.kernel), "-append", config.append]
    if config.initrd is not None:
        args += ["-initrd", str(config.initrd)]
    for name, path in sorted(config.fw_cfg.items()):
        args += ["-fw_cfg", f"name={name},file={path}"]
    args += config.net.args() if config.net else ["-nic", "none"]
    for drive in config.drives:
        args += ["-drive", drive]
    return args + list(config.extra_args)


class QemuProcess:
    """A running QEMU; a context manager that always stops it."""

    def __init__(self, config: QemuConfig, log: Path) -> None:
        for path in (config.kernel, config.initrd, *config.fw_cfg.values()):
            if path is not None and not Path(path).is_file():
                raise ToolError("QEMU input file not found", str(path))
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_bytes(b"")
        self.command = qemu_command(config, self.log)
        self._stderr = self.log.with_name(self.log.name + ".stderr")
        with open(self._stderr, "wb") as err:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, start_new_session=True)

    def console(self) -> str:
        try:
            return self.log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        try:
            return self._stderr.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """Wait until the console matches `pattern` (a regex); None on exit or timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.console())
            if match:
                return match
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return regex.search(self.console())
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_qemu(config: QemuConfig, log: Path) -> QemuProcess:
    """Start QEMU in the background (raises ToolError when qemu is missing)."""
    return QemuProcess(config, log)


def run_qemu(config: QemuConfig, log: Path, *, marker: str | None = None, timeout: float = 300,
             stop_on_marker: bool = True) -> QemuResult:
    """Boot, wait for `marker` (regex) or QEMU's exit, stop QEMU; return console and status.

    With `stop_on_marker=False` the marker is only recorded and QEMU runs until it
    exits by itself (e.g. the guest powers off) or the timeout.
    """
    deadline = time.monotonic() + timeout
    with start_qemu(config, log) as vm:
        matched: str | None = None
        if marker is not None:
            match = vm.wait_for(marker, timeout)
            matched = match.group(0) if match else None
        if matched is None or not stop_on_marker:
            status = vm.wait_exit(max(0.0, deadline - time.monotonic()))
        else:
            status = vm.proc.poll()
        timed_out = status is None and matched is None
        if status is None and matched is None and vm.proc.poll() is not None:
            status = vm.proc.returncode
    console = vm.console()
    if status is not None and status != 0 and not console:
        raise ToolError(f"{QEMU} failed (exit {status}): {vm.stderr().strip()[-500:]}",
                        " ".join(vm.command))
    return QemuResult(console, status, matched, timed_out)


def ensure_qemu(extra: Sequence[str] = ()) -> None:
    """Raise ToolError early when QEMU is missing (for CLIs and test skips)."""
    qemu_binary()
    for tool in extra:
        if shutil.which(tool) is None:
            raise ToolError(f"{tool} not found")
