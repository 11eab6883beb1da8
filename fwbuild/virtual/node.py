"""`fwbuild virtual-node boot`: the emulated bootloader, then QEMU with what it selected.

The EEPROM's bootconf.txt reaches the guest as the QEMU fw_cfg file
`opt/fwbuild/bootconf` (the Pi 5's blconfig nvmem). The guest's only network is QEMU
user networking with `restrict=on`: it reaches the host solely through the
`guestfwd` rules given (e.g. `tcp:10.0.2.100:22-tcp:127.0.0.1:2222`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import FwbuildError
from ..fsutil import atomic_write, mode_for
from .bootloader import BootFailure, Bootloader, RecoveryFlash
from .qemu import QemuConfig, UserNet, run_qemu

BOOTCONF_FW_CFG = "opt/fwbuild/bootconf"
DEFAULT_MARKER = r"FWBUILD-NODE-OS-READY"


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


@dataclass(frozen=True)
class NodeResult:
    ok: bool
    reason: str
    mode: str | None = None         # "http", "sd", "recovery" or None
    console: str = ""


def boot_node(options: NodeOptions, log: Callable[[str], None] = lambda line: None) -> NodeResult:
    """Boot a virtual node; never raises for a node that fails to boot (the result says why)."""
    try:
        eeprom = options.eeprom.read_bytes()
    except OSError as exc:
        raise FwbuildError(f"cannot read the node's EEPROM: {exc.strerror}", str(options.eeprom)) from None
    loader = Bootloader(eeprom, sd=options.sd, log=log, max_restarts=options.max_restarts)
    try:
        selection = loader.run()
    except BootFailure as exc:
        return NodeResult(False, exc.what)
    if isinstance(selection, RecoveryFlash):
        atomic_write(options.eeprom, selection.new_eeprom, mode_for(eeprom, selection.new_eeprom))
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
    config = QemuConfig(kernel=kernel, initrd=initrd, append=cmdline, memory_mb=options.memory_mb,
                        fw_cfg={BOOTCONF_FW_CFG: bootconf},
                        net=UserNet(guestfwd=options.guestfwd, restrict=True))
    result = run_qemu(config, work / "console.log", marker=options.marker, timeout=options.timeout)
    if result.matched:
        return NodeResult(True, f"reached the OS ({result.matched})", selection.mode, result.console)
    if result.timed_out:
        why = f"no marker /{options.marker}/ within {options.timeout:.0f} s"
    else:
        why = f"the guest stopped (QEMU exit {result.exit_status}) before the marker"
    tail = [line for line in result.console.splitlines() if line.strip()][-1:] or ["(no console output)"]
    return NodeResult(False, f"{why}; last console line: {tail[0]}", selection.mode, result.console)
