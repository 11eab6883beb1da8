"""`fwbuild virtual-node boot`: the emulated bootloader, then QEMU with what it selected.

The EEPROM's bootconf.txt reaches the guest as the QEMU fw_cfg file
`opt/fwbuild/bootconf` (the Pi 5's blconfig nvmem). The guest's only network is QEMU
user networking with `restrict=on`: it reaches the host solely through the
`guestfwd` rules given (e.g. `tcp:10.0.2.100:22-tcp:127.0.0.1:2222`).

The node's SPI flash is its `pieeprom.bin` file: the emulated bootloader reads it at each
power-on (partition B when an interrupted update left A broken, see
`bootloader.running_image`) and the guest sees it as a virtio disk with the serial
`fwbuild-spiflash`, which the VPN init reads and writes like the Pi 5's SPI NOR. A guest
reboot ends QEMU (`-no-reboot`): the caller powers the node on again.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FormatError, FwbuildError
from ..fsutil import atomic_write, mode_for
from .bootloader import BootFailure, Bootloader, RecoveryFlash, running_image
from .qemu import QemuConfig, UserNet, start_qemu

BOOTCONF_FW_CFG = "opt/fwbuild/bootconf"
DEFAULT_MARKER = r"FWBUILD-NODE-OS-READY"
FLASH_SERIAL = "fwbuild-spiflash"


@dataclass(frozen=True)
class NodeOptions:
    eeprom: Path
    workdir: Path
    sd: Path | None = None
    timeout: float = 300.0
    marker: str = DEFAULT_MARKER
    max_restarts: int = 2
    guestfwd: tuple[str, ...] = ()
    memory_mb: int = 512
    extra_cmdline: str = ""
    mac: str | None = None                  # the node's Ethernet MAC (QEMU's default otherwise)
    flash_drive: bool = True                # give the guest its SPI flash (the eeprom file)
    # The virtual walt-net as the bootloader sees it: (host, port) -> where it really is.
    walt_net: Mapping[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    source_address: str | None = None       # the node's address for the bootloader's HTTP
    power_cut: str | None = None            # regex: SIGKILL QEMU when the console matches it


@dataclass(frozen=True)
class NodeResult:
    ok: bool
    reason: str
    mode: str | None = None         # "http", "sd", "recovery" or None
    console: str = ""
    exit_status: int | None = None  # QEMU's exit status (0: the guest rebooted or powered off)
    power_cut: bool = False         # the power was cut (options.power_cut matched)


def boot_node(options: NodeOptions, log: Callable[[str], None] = lambda line: None) -> NodeResult:
    """Power a virtual node on once; never raises for a node that fails to boot (the result says why)."""
    try:
        flash = options.eeprom.read_bytes()
    except OSError as exc:
        raise FwbuildError(f"cannot read the node's EEPROM: {exc.strerror}", str(options.eeprom)) from None
    try:
        eeprom = running_image(flash, log)
    except FormatError as exc:
        log(f"EEPROM: {exc.what}: the bootloader does not start (a bricked board)")
        return NodeResult(False, f"the EEPROM flash holds no bootable image: {exc.what}")
    loader = Bootloader(eeprom, sd=options.sd, log=log, max_restarts=options.max_restarts,
                        walt_net=options.walt_net, source_address=options.source_address)
    try:
        selection = loader.run()
    except BootFailure as exc:
        return NodeResult(False, exc.what)
    if isinstance(selection, RecoveryFlash):
        atomic_write(options.eeprom, selection.new_eeprom, mode_for(flash, selection.new_eeprom))
        digest = hashlib.sha256(selection.new_eeprom).hexdigest()
        return NodeResult(True, f"EEPROM flashed from the SD recovery kit (sha256 {digest[:16]}); "
                                "remove the card and power-cycle", "recovery")
    if selection.initramfs is None:
        return NodeResult(False, "config.txt names no initramfs: the virtual Pi 5 has no root device",
                          selection.mode)
    work = options.workdir
    work.mkdir(parents=True, exist_ok=True)
    kernel, initrd, bootconf = work / "kernel.img", work / "initramfs", work / "bootconf.txt"
    atomic_write(kernel, selection.kernel)
    atomic_write(initrd, selection.initramfs)
    atomic_write(bootconf, selection.bootconf.encode(), 0o600)  # may hold node credentials
    cmdline = " ".join(part for part in (selection.cmdline, options.extra_cmdline) if part)
    log(f"Starting Linux ({selection.mode}): {cmdline}")
    drives: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    if options.flash_drive:
        # The SPI flash: raw, written through to the file (a power cut keeps what was written).
        drives = (f"file={options.eeprom.resolve()},format=raw,if=none,id=spiflash,cache=writethrough",)
        devices = ("-device", f"virtio-blk-pci,drive=spiflash,serial={FLASH_SERIAL}")
    config = QemuConfig(kernel=kernel, initrd=initrd, append=cmdline, memory_mb=options.memory_mb,
                        fw_cfg={BOOTCONF_FW_CFG: bootconf},
                        net=UserNet(guestfwd=options.guestfwd, restrict=True, mac=options.mac),
                        drives=drives, extra_args=devices)
    return _run(config, options, selection.mode, work / "console.log")


def _run(config: QemuConfig, options: NodeOptions, mode: str, log_path: Path) -> NodeResult:
    marker = re.compile(options.marker)
    cut = re.compile(options.power_cut) if options.power_cut else None
    deadline = time.monotonic() + options.timeout
    with start_qemu(config, log_path) as vm:
        while True:
            console = vm.console()
            found = marker.search(console)
            if found:
                return NodeResult(True, f"reached the OS ({found.group(0)})", mode, console)
            if cut is not None and cut.search(console):
                os.killpg(vm.proc.pid, signal.SIGKILL)  # the power cable, not a shutdown
                vm.proc.wait()
                return NodeResult(False, f"power cut when the console showed /{options.power_cut}/", mode,
                                  vm.console(), vm.proc.returncode, power_cut=True)
            status = vm.proc.poll()
            if status is not None:
                console = vm.console()
                found = marker.search(console)
                if found:
                    return NodeResult(True, f"reached the OS ({found.group(0)})", mode, console, status)
                tail = [line for line in console.splitlines() if line.strip()][-1:] or ["(no console output)"]
                if status != 0 and not console:
                    tail = [vm.stderr().strip()[-300:] or "(no output)"]
                return NodeResult(False, f"the guest stopped (QEMU exit {status}) before the marker; "
                                         f"last console line: {tail[0]}", mode, console, status)
            if time.monotonic() > deadline:
                tail = [line for line in console.splitlines() if line.strip()][-1:] or ["(no console output)"]
                return NodeResult(False, f"no marker /{options.marker}/ within {options.timeout:.0f} s; "
                                         f"last console line: {tail[0]}", mode, console)
            time.sleep(0.2)
