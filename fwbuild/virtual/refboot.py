"""Boot the virtual node from a root image through the VPN, over a modelled network path.

`boot_image` runs one boot: a `RecordingSshd` (its own network namespace) serves the
directory holding the image, a `NetRelay` with the given `Profile` sits between QEMU's
user network and the sshd, and QEMU boots Debian's arm64 kernel with the VPN
initramfs in image mode. It waits for the root's first line (`init_line`) and the
marker, and returns the times, the SFTP figures and the READ offsets of the image.

`record_working_set` is the reference boot: LAN profile, no published set, then the
reads of the image become its `WorkingSet` (`<image>.prefetch` via `publish_working_set`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ToolError
from ..keys import init_keys, load_ssh_ca
from .netmodel import PROFILES, NetRelay, Profile
from .qemu import QemuConfig, start_qemu
from .sshd import SftpStats, parse_sftp_log
from .vpnboot import FW_CFG_NAME, issue_node_credentials, pack_credentials, vpn_config_text
from .workingset import (
    RecordingSshd,
    WorkingSet,
    parse_read_log,
    remove_working_set,
    working_set_from_reads,
)

NODE_MAC = "52:54:00:00:be:0d"
NODE_KEY_ID = "vpn_52540000be0d"  # the SSH gate takes a node certificate's key id as vpn_<mac12>


@dataclass(frozen=True)
class BootRun:
    profile: str
    to_init_s: float            # QEMU start -> the root's init prints its first line
    to_marker_s: float          # QEMU start -> the marker (multi-user.target)
    sftp: SftpStats             # every SFTP request of the boot
    reads: tuple[tuple[int, int], ...]   # READs of the image (offset, length), in order
    relay_down: int             # bytes the path delivered to the node
    relay_up: int
    console: Path
    prefetch_line: str          # the init's "walt-vpn: prefetch: ..." line ("" if none)
    cpu_s: float = 0.0          # CPU time QEMU used up to the marker (the host is shared)


def boot_image(work: Path, image: Path, kernel: Path, initrd: Path, profile: Profile = PROFILES["lan"],
               *, marker: str, init_line: str, memory_mb: int = 1024, timeout: float = 1200,
               append: str = "", tunnel: bool = True) -> BootRun:
    """One boot of `image` (its directory is what the sshd serves); raises ToolError on failure.

    The sshd opens the node's Ethernet tunnel, as the server's entrypoints do (its tap
    device stays in the sshd's namespace); `tunnel=False` refuses it (the node waits its
    `tap_wait` and boots on without walt-vpn)."""
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    keys = init_keys(work / "keys").directory
    ssh_dir = work / "sshd"
    with RecordingSshd(ssh_dir, ca_public_key=(keys / "ssh-ca.pub").read_text(), netns=True,
                       gate_root=str(image), permit_tunnel=tunnel) as sshd, \
            NetRelay(("127.0.0.1", sshd.port), profile) as relay:
        creds = issue_node_credentials(load_ssh_ca(keys / "ssh-ca"), NODE_KEY_ID,
                                       sshd.known_hosts_line("10.0.2.2", relay.port))
        config = work / "bootconf.txt"
        config.write_text(vpn_config_text({
            "WALT_VPN_MAC": NODE_MAC, "WALT_VPN_ENTRYPOINT": f"10.0.2.2:{relay.port}",
            "WALT_VPN_BOOT_MODE": "enforced", "WALT_VPN_USER": "walt-vpn",
            "WALT_VPN_ROOT": str(image), "WALT_VPN_CREDS": pack_credentials(creds)}))
        qemu = QemuConfig(kernel=kernel, initrd=initrd, memory_mb=memory_mb,
                          append=f"console=ttyAMA0 panic=-1 {append}".strip(),
                          fw_cfg={FW_CFG_NAME: config},
                          extra_args=("-netdev", "user,id=n0",
                                      "-device", "virtio-net-pci,netdev=n0,romfile="))
        console = work / "console.log"
        start = time.monotonic()
        with start_qemu(qemu, console) as vm:
            first = vm.wait_for(re.escape(init_line), timeout)
            t_init = time.monotonic() - start
            done = vm.wait_for(re.escape(marker), timeout) if first else None
            t_marker = time.monotonic() - start
            cpu = _cpu_seconds(vm.proc.pid)
            text = vm.console()
            vm.stop()
        if not first or not done:
            raise ToolError(f"the {profile.name} boot of {image.name} did not reach "
                            f"{'the marker' if first else 'the root'}", str(console),
                            "read the console log")
        time.sleep(0.5)  # let the relays write their last lines
        sftp = parse_sftp_log(sshd.sftp_log.read_text())
        reads = tuple(parse_read_log(sshd.read_log.read_text(), str(image)))
        down, up = relay.bytes_down, relay.bytes_up
    line = next((m.group(0).strip() for m in re.finditer(r"walt-vpn: prefetch: [^\r\n]*", text)), "")
    return BootRun(profile.name, t_init, t_marker, sftp, reads, down, up, console, line, cpu)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc), 0.0 if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def record_working_set(work: Path, image: Path, kernel: Path, initrd: Path, *, marker: str,
                       init_line: str, append: str = "") -> tuple[WorkingSet, BootRun]:
    """The reference boot (LAN, no set published) and the working set it read."""
    remove_working_set(image)
    run = boot_image(work, image, kernel, initrd, PROFILES["lan"], marker=marker,
                     init_line=init_line, append=append)
    if not run.reads:
        raise ToolError("the reference boot read nothing from the image", str(run.console))
    return working_set_from_reads(run.reads, image), run
