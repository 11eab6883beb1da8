"""End to end: Debian's arm64 kernel + the VPN initramfs in qemu-system-aarch64 -M virt,
config through fw_cfg, a real sshd on the host's loopback (reached from the guest as
10.0.2.2 through QEMU user networking), a tiny arm64 root exported over SFTP."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fwbuild.keys import load_ssh_ca
from fwbuild.virtual.qemu import QemuConfig, QemuResult, run_qemu, start_qemu
from fwbuild.virtual.rootfs import (
    BOOT_MARKER,
    HOLDING,
    LATE_CONTENT,
    LATE_READ,
    MARKER,
    PASS_DONE,
    SENTINEL,
    TAP_LINE,
    TUNPING,
    build_root_image,
    build_tiny_root,
)
from fwbuild.virtual.sshd import TestSshd, sftp_stats_between
from fwbuild.virtual.vpnboot import (
    FW_CFG_NAME,
    VpnInitSettings,
    issue_node_credentials,
    pack_credentials,
    vpn_config_text,
    vpn_initramfs_spec,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the test sshd needs root"),
    pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None, reason="no qemu-system-aarch64"),
]

KERNEL_PACKAGE = "linux-image-cloud-arm64"
VPN_MAC = "52:54:00:12:34:56"
RETRIES = 2
CMDLINE = f"console=ttyAMA0 panic=-1 walt_vpn.retries={RETRIES} walt_vpn.backoff=1"


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path
    root: Path    # exported directory
    image: Path   # the same root as an ext4 image


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    from fwbuild.cache import Cache
    from fwbuild.initramfs.builder import build_initramfs, stage_kernel

    # The same per-session cache conftest points FWBUILD_CACHE to (module scope runs first).
    cache = Cache(tmp_path_factory.getbasetemp() / "fwbuild-cache")
    work = tmp_path_factory.mktemp("vpnboot")
    kernel = stage_kernel(KERNEL_PACKAGE, cache)
    spec = vpn_initramfs_spec(KERNEL_PACKAGE, settings=VpnInitSettings(tap_wait=3))
    initrd = work / "initramfs"
    initrd.write_bytes(build_initramfs(spec, cache).data)
    root = build_tiny_root(work / "export" / "root", cache)
    (work / "export" / "images").mkdir()
    image = build_root_image(root, work / "export" / "images" / "root.img")
    return Guest(kernel.image, initrd, root, image)


@pytest.fixture
def sshd(tmp_path: Path, session_keys: Path, guest: Guest) -> Iterator[TestSshd]:
    # The SSH gate confines SFTP to the export (the root directory and images/root.img).
    with TestSshd(tmp_path / "sshd", ca_public_key=(session_keys / "ssh-ca.pub").read_text(),
                  gate_root=str(guest.root.parent)) as server:
        yield server


def guest_config(guest: Guest, tmp_path: Path, session_keys: Path, sshd: TestSshd | None, *,
                 port: int | None = None, mode: str = "enforced", root: Path | None = None,
                 known_hosts: str | None = None, key_id: str = "vpn_525400123456",
                 cmdline: str = "", domain: str | None = None,
                 extra: dict[str, str] | None = None) -> QemuConfig:
    """QEMU settings for a node whose config names `sshd` (or `port`) at 10.0.2.2."""
    port = port or (sshd.port if sshd else 1)
    if known_hosts is None:
        assert sshd is not None
        known_hosts = sshd.known_hosts_line("10.0.2.2")
    creds = issue_node_credentials(load_ssh_ca(session_keys / "ssh-ca"), key_id, known_hosts)
    config = tmp_path / "bootconf.txt"
    config.write_text(vpn_config_text({
        "BOOT_UART": "1",
        "WALT_VPN_MAC": VPN_MAC,
        "WALT_VPN_ENTRYPOINT": f"10.0.2.2:{port}",
        "WALT_VPN_BOOT_MODE": mode,
        "WALT_VPN_USER": "walt-vpn",
        "WALT_VPN_ROOT": str(root or guest.root),
        "WALT_VPN_CREDS": pack_credentials(creds),
        **(extra or {}),
    }))
    netdev = "user,id=n0" + (f",domainname={domain}" if domain else "")
    return QemuConfig(kernel=guest.kernel, initrd=guest.initrd, append=f"{CMDLINE} {cmdline}",
                      memory_mb=768, fw_cfg={FW_CFG_NAME: config},
                      extra_args=("-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,romfile="))


def boot(guest: Guest, tmp_path: Path, session_keys: Path, sshd: TestSshd | None, *,
         marker: str = MARKER, timeout: float = 300, stop_on_marker: bool = False,
         **options: Any) -> QemuResult:
    """Boot until `marker`, then (unless `stop_on_marker`) until QEMU exits by itself."""
    qemu = guest_config(guest, tmp_path, session_keys, sshd, **options)
    return run_qemu(qemu, tmp_path / "console.log", marker=marker, timeout=timeout,
                    stop_on_marker=stop_on_marker)


def vpn_lines(console: str) -> list[str]:
    return [line.strip() for line in console.splitlines() if line.startswith("walt-vpn: ")]


def test_boots_through_sshfs_and_switch_root(guest: Guest, tmp_path: Path, session_keys: Path,
                                             sshd: TestSshd) -> None:
    result = boot(guest, tmp_path, session_keys, sshd, cmdline="fwbuild.readtwice")
    lines = vpn_lines(result.console)
    assert result.matched == MARKER, result.console[-3000:]
    assert result.exit_status == 0  # the tiny root powered off
    assert f"walt-vpn: ssh: authenticated to 10.0.2.2:{sshd.port} as walt-vpn " \
           "(certificate, pinned host key)" in lines
    assert f"walt-vpn: root: mounted {guest.root} read-only (sshfs over the SSH connection)" in lines
    assert re.search(rf"{BOOT_MARKER} root=tiny pid=1\b", result.console)
    assert "Accepted publickey for walt-vpn" in sshd.log_text()
    assert "ID vpn_525400123456" in sshd.log_text()  # logged in with the certificate
    # The default sshd refuses tunnels: the boot goes on without walt-vpn, one line says so.
    assert "walt-vpn: tunnel: the entrypoint opened no Ethernet tunnel; continuing without " \
           "walt-vpn" in lines
    # Directory mode: the second pass lists no directory and reads no data over the network;
    # only opening a file still asks the server (sshfs sends OPEN + LSTAT + CLOSE).
    log = sshd.sftp_log.read_text()
    second = sftp_stats_between(log, "/" + SENTINEL.format(1), "/" + SENTINEL.format(2))
    first_pass_reads = sftp_stats_between(log, str(guest.root) + "/bin/busybox",
                                          "/" + SENTINEL.format(1))
    assert first_pass_reads.requests["READ"] > 0
    assert second.requests["READ"] == 0
    assert second.requests["READDIR"] == 0 and second.requests["OPENDIR"] == 0
    assert set(second.requests) <= {"OPEN", "LSTAT", "CLOSE"}


def test_image_root_second_pass_crosses_no_network(guest: Guest, tmp_path: Path,
                                                   session_keys: Path, sshd: TestSshd) -> None:
    result = boot(guest, tmp_path, session_keys, sshd, root=guest.image, cmdline="fwbuild.readtwice")
    assert result.matched == MARKER, result.console[-3000:]
    assert f"walt-vpn: root: mounted image {guest.image} read-only (loop over sshfs)" \
        in vpn_lines(result.console)
    log = sshd.sftp_log.read_text()
    second = sftp_stats_between(log, "/" + SENTINEL.format(1), "/" + SENTINEL.format(2))
    assert second.total_requests == 0, second
    entries = re.findall(PASS_DONE.format(r"\d") + r" entries=(\d+)", result.console)
    assert len(entries) == 2 and int(entries[0]) > 40  # both passes walked the whole tree
    assert sshd.sftp_stats().requests["OPEN"] == 1  # the image, opened once


def test_wrong_host_key_is_refused(guest: Guest, tmp_path: Path, session_keys: Path,
                                   sshd: TestSshd) -> None:
    impostor = TestSshd(tmp_path / "impostor", ca_public_key="unused")
    result = boot(guest, tmp_path, session_keys, sshd,
                  known_hosts=impostor.known_hosts_line("10.0.2.2", sshd.port))
    lines = vpn_lines(result.console)
    refused = f"SSH entrypoint 10.0.2.2:{sshd.port} presented a host key that is not pinned (refused)"
    assert lines[-2:] == [
        f"walt-vpn: {refused}; retrying in 1s (attempt 1/{RETRIES})",
        f"walt-vpn: {refused}; giving up after {RETRIES} attempts: rebooting (enforced mode)",
    ], result.console[-3000:]
    assert BOOT_MARKER not in result.console
    assert result.exit_status == 0 and not result.timed_out  # the reboot ended QEMU (-no-reboot)
    assert sshd.sftp_stats().total_requests == 0


def test_revoked_certificate_is_refused(guest: Guest, tmp_path: Path, session_keys: Path,
                                        sshd: TestSshd) -> None:
    sshd.revoke_key_ids(["vpn_52540000dead"])
    result = boot(guest, tmp_path, session_keys, sshd, key_id="vpn_52540000dead")
    lines = vpn_lines(result.console)
    refused = (f"SSH entrypoint 10.0.2.2:{sshd.port} refused the node certificate "
               "(revoked, expired or wrong principal)")
    assert lines[-1] == f"walt-vpn: {refused}; giving up after {RETRIES} attempts: " \
                        "rebooting (enforced mode)", result.console[-3000:]
    assert f"walt-vpn: {refused}; retrying in 1s (attempt 1/{RETRIES})" in lines
    assert BOOT_MARKER not in result.console
    assert "revoked" in sshd.log_text().lower()
    assert sshd.sftp_stats().total_requests == 0


@pytest.mark.parametrize(("mode", "fallback"), [
    ("enforced", "rebooting (enforced mode)"),
    ("permissive", "dropping to a rescue shell (permissive mode)"),
])
def test_unreachable_entrypoint_retries_then_falls_back(guest: Guest, tmp_path: Path,
                                                        session_keys: Path, mode: str,
                                                        fallback: str) -> None:
    from fwbuild.virtual.sshd import free_port

    port = free_port()  # nothing listens there
    result = boot(guest, tmp_path, session_keys, None, port=port, mode=mode,
                  known_hosts=f"[10.0.2.2]:{port} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDQ7\n",
                  marker="walt-vpn: .*giving up.*", timeout=240,
                  stop_on_marker=mode == "permissive")
    lines = vpn_lines(result.console)
    failing = [line for line in lines if "unreachable" in line]
    assert len(failing) == RETRIES, result.console[-3000:]
    assert failing[0].endswith(f"; retrying in 1s (attempt 1/{RETRIES})")
    assert failing[-1].endswith(f"; giving up after {RETRIES} attempts: {fallback}")
    assert BOOT_MARKER not in result.console
    if mode == "enforced":
        assert result.exit_status == 0  # rebooted: QEMU -no-reboot exits
    else:
        assert result.exit_status is None  # the rescue shell keeps the node up until we stop it


def test_walt_net_permissive_skips_tunnel_but_checks_host_key(guest: Guest, tmp_path: Path,
                                                              session_keys: Path,
                                                              sshd: TestSshd) -> None:
    result = boot(guest, tmp_path, session_keys, sshd, mode="permissive", domain="walt")
    lines = vpn_lines(result.console)
    assert result.matched == MARKER, result.console[-3000:]
    assert "walt-vpn: network: eth0 is up (DHCP lease obtained, domain walt)" in lines
    assert "walt-vpn: network: on walt-net (DHCP domain walt): no tunnel, checking the " \
           "server's pinned host key" in lines
    assert not any("tunnel:" in line for line in lines)


def test_walt_net_impostor_is_refused(guest: Guest, tmp_path: Path, session_keys: Path,
                                      sshd: TestSshd) -> None:
    impostor = TestSshd(tmp_path / "impostor", ca_public_key="unused")
    result = boot(guest, tmp_path, session_keys, sshd, mode="permissive", domain="walt",
                  known_hosts=impostor.known_hosts_line("10.0.2.2", sshd.port),
                  marker="walt-vpn: .*giving up.*", stop_on_marker=True)
    lines = vpn_lines(result.console)
    assert lines[-1].endswith("presented a host key that is not pinned (refused); giving up after "
                              f"{RETRIES} attempts: dropping to a rescue shell (permissive mode)")
    assert BOOT_MARKER not in result.console


def test_ethernet_tunnel_carries_frames(guest: Guest, tmp_path: Path, session_keys: Path) -> None:
    # sshd in a network namespace of its own: its tap device and addresses stay off the host.
    with TestSshd(tmp_path / "sshd", ca_public_key=(session_keys / "ssh-ca.pub").read_text(),
                  permit_tunnel=True, netns=True, gate_root=str(guest.root.parent)) as sshd:
        qemu = guest_config(guest, tmp_path, session_keys, sshd,
                            cmdline="fwbuild.tunping=192.168.77.2/24,192.168.77.1 fwbuild.hold=15")
        with start_qemu(qemu, tmp_path / "console.log") as vm:
            assert vm.wait_for(f"walt-vpn: tunnel: interface walt-vpn is up \\(MAC {VPN_MAC}\\)",
                               300), vm.console()[-3000:]
            links = sshd.run_in_netns(["ip", "-o", "link", "show"]).stdout
            taps = re.findall(r"^\d+: (tap\d+)[:@]", links, re.MULTILINE)
            assert len(taps) == 1, links
            for argv in (["ip", "addr", "add", "192.168.77.1/24", "dev", taps[0]],
                         ["ip", "link", "set", taps[0], "up"]):
                assert sshd.run_in_netns(argv).returncode == 0
            assert vm.wait_for(HOLDING, 120), vm.console()[-3000:]
            # The other way, while the node holds: the server pings the node through the
            # tunnel and learns it by WALT_VPN_MAC.
            ping = sshd.run_in_netns([shutil.which("busybox") or "busybox", "ping", "-c", "1",
                                      "-w", "10", "192.168.77.2"])
            neighbours = sshd.run_in_netns(["ip", "neigh", "show", "dev", taps[0]]).stdout
            assert vm.wait_for(MARKER, 120), vm.console()[-3000:]
            vm.wait_exit(60)
    console = vm.console()
    assert re.search(rf"{TAP_LINE} mac={VPN_MAC} state=(up|unknown)", console)
    assert f"{TUNPING} ok 192.168.77.1" in console, console[-3000:]
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert f"192.168.77.2 lladdr {VPN_MAC}" in neighbours, neighbours


def test_short_vpn_session_after_switch_root_reboots(guest: Guest, tmp_path: Path,
                                                      session_keys: Path, sshd: TestSshd) -> None:
    # The supervisor survives switch_root (it runs from the tmpfs mini-root) and applies
    # WalT's rule: a session shorter than 60 s means a broken setup.
    qemu = guest_config(guest, tmp_path, session_keys, sshd, cmdline="fwbuild.hold=120")
    with start_qemu(qemu, tmp_path / "console.log") as vm:
        assert vm.wait_for(HOLDING, 300), vm.console()[-3000:]
        assert sshd.drop_sessions()
        line = vm.wait_for(r"walt-vpn: tunnel: the VPN session lasted only \d+s "
                           r"\(broken setup\): rebooting", 60)
        assert line, vm.console()[-3000:]
        assert vm.wait_exit(60) == 0  # rebooted (-no-reboot ends QEMU)
    assert MARKER not in vm.console()


def test_dropped_vpn_session_reconnects_and_root_keeps_working(guest: Guest, tmp_path: Path,
                                                               session_keys: Path,
                                                               sshd: TestSshd) -> None:
    qemu = guest_config(guest, tmp_path, session_keys, sshd,
                        cmdline="fwbuild.hold=30 walt_vpn.min_session=0")
    with start_qemu(qemu, tmp_path / "console.log") as vm:
        assert vm.wait_for(HOLDING, 300), vm.console()[-3000:]
        accepted = sshd.log_text().count("Accepted publickey")
        assert sshd.drop_sessions()
        assert vm.wait_for(r"walt-vpn: tunnel: the VPN session dropped after \d+s; reconnecting", 60)
        assert vm.wait_for("walt-vpn: tunnel: reconnected to the entrypoint", 60), vm.console()[-3000:]
        # A file never read before: sshfs reconnects through the new master connection.
        assert vm.wait_for(MARKER, 120), vm.console()[-3000:]
        assert vm.wait_exit(60) == 0
    assert f"{LATE_READ} {LATE_CONTENT}" in vm.console()
    assert sshd.log_text().count("Accepted publickey") > accepted


def test_http_connect_proxy_traversal(guest: Guest, tmp_path: Path, session_keys: Path,
                                      sshd: TestSshd) -> None:
    from test_vpnboot import ConnectProxy

    proxy = ConnectProxy(sshd.port)
    try:
        result = boot(guest, tmp_path, session_keys, sshd,
                      extra={"WALT_VPN_HTTP_PROXY": f"10.0.2.2:{proxy.port}"})
    finally:
        proxy.close()
    assert result.matched == MARKER, result.console[-3000:]
    assert proxy.requests and all(r == f"CONNECT 10.0.2.2:{sshd.port} HTTP/1.1"
                                  for r in proxy.requests)
    assert f"walt-vpn: ssh: authenticated to 10.0.2.2:{sshd.port} as walt-vpn " \
           "(certificate, pinned host key)" in vpn_lines(result.console)


def test_http_proxy_refusal_is_one_clear_line(guest: Guest, tmp_path: Path, session_keys: Path,
                                              sshd: TestSshd) -> None:
    from test_vpnboot import ConnectProxy

    proxy = ConnectProxy(allowed_port=1)  # refuses every CONNECT
    try:
        result = boot(guest, tmp_path, session_keys, sshd,
                      extra={"WALT_VPN_HTTP_PROXY": f"10.0.2.2:{proxy.port}"})
    finally:
        proxy.close()
    lines = vpn_lines(result.console)
    assert lines[-1] == (f"walt-vpn: HTTP proxy 10.0.2.2:{proxy.port} refused CONNECT to "
                         f"10.0.2.2:{sshd.port} (HTTP/1.1 403 Forbidden); giving up after "
                         f"{RETRIES} attempts: rebooting (enforced mode)"), result.console[-3000:]
    assert BOOT_MARKER not in result.console
