"""Benchmark the VPN boot: QEMU start -> switch_root -> marker, SFTP requests and bytes.

For each added round-trip time (0, 50, 200 ms by default) and each root mode
(`dir`: sshfs over the exported directory + overlay; `image`: an ext4 image of the
same tree loop-mounted through sshfs), boot Debian's arm64 kernel with the VPN
initramfs against a real sshd running in a network namespace created here (latency
by netem on the namespace's loopback, or by the forwarder's delay line when the
kernel has no netem). The tiny root reads its whole tree twice; SFTP sentinels split
the server's log into: boot (up to the root's init), first pass, second pass.

Needs root, qemu-system-aarch64, and network access to the Debian archive the first
time (packages are cached in FWBUILD_CACHE). Prints figures; asserts nothing.

    python3 bench/vpnboot.py [--rtt 0,50,200] [--modes dir,image]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fwbuild.initramfs.builder import build_initramfs, stage_kernel
from fwbuild.keys import init_keys, load_ssh_ca
from fwbuild.sources import Cache
from fwbuild.virtual.qemu import QemuConfig, start_qemu
from fwbuild.virtual.rootfs import (
    BOOT_MARKER,
    MARKER,
    SENTINEL,
    build_root_image,
    build_tiny_root,
)
from fwbuild.virtual.sshd import SftpStats, TestSshd, parse_sftp_log, sftp_stats_between
from fwbuild.virtual.vpnboot import (
    FW_CFG_NAME,
    issue_node_credentials,
    pack_credentials,
    vpn_config_text,
    vpn_initramfs_spec,
)

KERNEL_PACKAGE = "linux-image-cloud-arm64"


def _before(text: str, sentinel: str) -> SftpStats:
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines) if line.endswith(sentinel)), len(lines))
    return parse_sftp_log("\n".join(lines[:end]))


def run_one(work: Path, keys: Path, kernel: Path, initrd: Path, root: Path, rtt: int) -> dict[str, object]:
    work.mkdir(parents=True)
    with TestSshd(work / "sshd", ca_public_key=(keys / "ssh-ca.pub").read_text(), netns=True,
                  added_rtt_ms=rtt, gate_root=str(root)) as sshd:
        # The SSH gate accepts node key ids only (vpn_<mac12>).
        creds = issue_node_credentials(load_ssh_ca(keys / "ssh-ca"), "vpn_52540000be0c",
                                       sshd.known_hosts_line("10.0.2.2"))
        config = work / "bootconf.txt"
        config.write_text(vpn_config_text({
            "WALT_VPN_MAC": "52:54:00:00:be:0c", "WALT_VPN_ENTRYPOINT": f"10.0.2.2:{sshd.port}",
            "WALT_VPN_BOOT_MODE": "enforced", "WALT_VPN_USER": "walt-vpn",
            "WALT_VPN_ROOT": str(root), "WALT_VPN_CREDS": pack_credentials(creds)}))
        qemu = QemuConfig(kernel=kernel, initrd=initrd, memory_mb=768,
                          append="console=ttyAMA0 panic=-1 fwbuild.readtwice",
                          fw_cfg={FW_CFG_NAME: config},
                          extra_args=("-netdev", "user,id=n0",
                                      "-device", "virtio-net-pci,netdev=n0,romfile="))
        start = time.monotonic()
        with start_qemu(qemu, work / "console.log") as vm:
            booted = vm.wait_for(BOOT_MARKER, 900)
            t_booted = time.monotonic() - start
            done = vm.wait_for(MARKER, 900)
            t_done = time.monotonic() - start
            vm.wait_exit(30)
        if not booted or not done:
            raise SystemExit(f"boot failed, see {work / 'console.log'}:\n{vm.console()[-2000:]}")
        vm.stop()
        time.sleep(1)  # let sshd log the closed connections
        log = sshd.sftp_log.read_text()
        method = sshd.latency_method
        ssh_bytes = sum(int(a) + int(b) for a, b in re.findall(
            r"Transferred: sent (\d+), received (\d+) bytes", sshd.log_text()))
    boot = _before(log, "/" + SENTINEL.format(0))
    first = sftp_stats_between(log, "/" + SENTINEL.format(0), "/" + SENTINEL.format(1))
    second = sftp_stats_between(log, "/" + SENTINEL.format(1), "/" + SENTINEL.format(2))
    return {"to_root_init_s": t_booted, "to_marker_s": t_done, "boot": boot, "first": first,
            "second": second, "total": parse_sftp_log(log), "latency": method,
            "ssh_bytes": ssh_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt", default="0,50,200", help="added round-trip times in ms")
    parser.add_argument("--modes", default="dir,image")
    args = parser.parse_args()
    cache = Cache.default()
    with tempfile.TemporaryDirectory(prefix="fwbuild-bench-vpnboot-") as tmp:
        work = Path(tmp)
        print("preparing kernel, initramfs, tiny root ...", flush=True)
        kernel = stage_kernel(KERNEL_PACKAGE, cache)
        initrd = work / "initramfs"
        initrd.write_bytes(build_initramfs(vpn_initramfs_spec(KERNEL_PACKAGE), cache).data)
        root = build_tiny_root(work / "export" / "root", cache)
        (work / "export" / "images").mkdir()
        image = build_root_image(root, work / "export" / "images" / "root.img")
        keys = init_keys(work / "keys").directory
        print(f"initramfs {initrd.stat().st_size} B, root image {image.stat().st_size} B")
        header = (f"{'rtt':>5} {'mode':>5} | {'to init':>8} {'to mark':>8} | {'boot req':>8} "
                  f"{'boot KiB':>8} | {'pass1 req':>9} {'pass2 req':>9} | {'total req':>9} "
                  f"{'total KiB':>9} {'ssh KiB':>8}")
        print(header)
        print("-" * len(header))
        methods = set()
        for rtt in (int(v) for v in args.rtt.split(",")):
            for mode in args.modes.split(","):
                target = root if mode == "dir" else image
                r = run_one(work / f"run-{rtt}-{mode}", keys, kernel.image, initrd, target, rtt)
                boot, first, second, total = (r["boot"], r["first"], r["second"], r["total"])
                assert isinstance(boot, SftpStats) and isinstance(total, SftpStats)
                assert isinstance(first, SftpStats) and isinstance(second, SftpStats)
                methods.add(str(r["latency"]))
                print(f"{rtt:>5} {mode:>5} | {r['to_root_init_s']:>7.1f}s {r['to_marker_s']:>7.1f}s | "
                      f"{boot.total_requests:>8} {boot.total_bytes / 1024:>8.0f} | "
                      f"{first.total_requests:>9} {second.total_requests:>9} | "
                      f"{total.total_requests:>9} {total.total_bytes / 1024:>9.0f} "
                      f"{int(str(r['ssh_bytes'])) / 1024:>8.0f}", flush=True)
        print(f"added latency: {', '.join(sorted(methods))}")
        print("to init: QEMU start -> the root's /sbin/init runs; to mark: after both read passes")
        print("boot/pass1/pass2: SFTP requests split by sentinel lookups; total KiB: SFTP packets "
              "both ways; ssh KiB: sshd's 'Transferred' totals (encrypted, all channels)")


if __name__ == "__main__":
    main()
