"""The virtual Pi 5 end to end (issue 8): build -> serve -> enroll -> HTTP boot -> tunnel -> root.

Everything runs on this machine: the server and sshd on 127.0.0.1, the node in
qemu-system-aarch64 with restrict=on user networking whose only way out is the
guestfwd rule to the sshd. Each scenario asserts on the bootloader log and the
guest's serial console.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild.bootimg.fat import read_all
from fwbuild.cli import main
from fwbuild.eeprom.bootconf import parse_bootconf
from fwbuild.eeprom.image import parse_image
from fwbuild.initramfs.builder import InitramfsSpec, build_initramfs
from fwbuild.virtual.rootfs import MARKER
from server.virtual_site import SiteHttpError, SiteOptions, VirtualSite
from tests.conftest import VirtualSet

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the site's sshd needs root"),
]

ROOT = Path(__file__).resolve().parents[2]
LOCAL_OS_MARKER = "FWBUILD-INITRAMFS-SHELL"
FAST_FAIL = "walt_vpn.retries=2 walt_vpn.backoff=1"

@pytest.fixture(scope="module")
def local_os(virtual_set: VirtualSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual SD card with a local OS: the same kernel, an initramfs that prints a marker."""
    card = tmp_path_factory.mktemp("sd-local-os")
    boot = read_all((virtual_set.out / "bootimg" / "boot.img").read_bytes())
    initramfs = build_initramfs(InitramfsSpec(epoch=1767225600), virtual_set.cache).data
    (card / "kernel_2712.img").write_bytes(boot["kernel_2712.img"])
    (card / "initramfs_2712").write_bytes(initramfs)
    (card / "config.txt").write_text("initramfs initramfs_2712 followkernel\n")
    (card / "cmdline.txt").write_text("console=ttyAMA0 fwbuild.poweroff\n")
    return card


@pytest.fixture
def site_factory(virtual_set: VirtualSet, tmp_path: Path) -> Iterator[Callable[..., VirtualSite]]:
    sites: list[VirtualSite] = []

    def start(artifacts: Path | None = None, mode: str = "enforced") -> VirtualSite:
        site = VirtualSite(SiteOptions(artifacts or virtual_set.out, virtual_set.keys, tmp_path / f"site{len(sites)}",
                                       default_mode=mode, cache=virtual_set.cache))
        sites.append(site)
        site.start()
        return site

    yield start
    for site in sites:
        site.stop()


def _bootconf(eeprom: Path) -> dict[str, str]:
    return parse_bootconf(parse_image(eeprom.read_bytes()).read_file("bootconf.txt").decode())


def _boot(site: VirtualSite, eeprom: Path, **kwargs: object) -> tuple[object, list[str]]:
    log: list[str] = []
    site.log = log.append
    result = site.boot(eeprom, **kwargs)  # type: ignore[arg-type]
    return result, log


def _nodes(site: VirtualSite, *args: str) -> str:
    result = CliRunner().invoke(main, ["nodes", *args, "--config", str(site.config_path)])
    assert result.exit_code == 0, result.output
    return result.output


def test_happy_path_enroll_http_boot_tunnel_root(site_factory: Callable[..., VirtualSite]) -> None:
    site = site_factory()
    eeprom = site.enroll("dc:a6:32:00:00:01")
    conf = _bootconf(eeprom)
    assert conf["BOOT_ORDER"] == "0xf7" and conf["HTTP_PATH"] == "walt-vpn/node/dca632000001"
    result, log = _boot(site, eeprom, name="happy")
    assert result.ok, (result.reason, result.console[-3000:])  # type: ignore[attr-defined]
    assert result.mode == "http"  # type: ignore[attr-defined]
    assert any("hash OK, RSA signature OK" in line for line in log)
    console = result.console  # type: ignore[attr-defined]
    assert "walt-vpn: ssh: authenticated to 10.0.2.100:22 as walt-vpn (certificate, pinned host key)" in console
    assert "root.img read-only (loop over sshfs)" in console
    assert MARKER in console
    # The server recorded what this node fetched: its whole boot.img from its own address
    # (boot.sig is not an event), and the SSH gate's digest check for its certificate's node.
    events = json.loads(_nodes(site, "show", "dc:a6:32:00:00:01", "--json"))["events"]
    fetched = {(e["artifact"], e["client"]) for e in events}
    assert "boot.img" in {artifact for artifact, _ in fetched}, events
    assert ("eeprom-digest", "ssh-gate") in fetched, events


class _TamperingEntrypoint(http.server.BaseHTTPRequestHandler):
    """A compromised HTTP entrypoint: forwards to the server, flips one byte of every boot.img."""

    upstream = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.upstream}{self.path}", timeout=30) as up:
                body = bytearray(up.read())
        except urllib.error.HTTPError as exc:
            self.send_error(exc.code)
            return
        if self.path.endswith("/boot.img"):
            body[len(body) // 2] ^= 0x01
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(bytes(body))


@pytest.fixture
def tampering_entrypoint() -> Iterator[tuple[int, type[_TamperingEntrypoint]]]:
    handler = type("Handler", (_TamperingEntrypoint,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], handler
    httpd.shutdown()


def test_tampered_boot_img(virtual_set: VirtualSet, tmp_path: Path, local_os: Path,
                           tampering_entrypoint: tuple[int, type[_TamperingEntrypoint]]) -> None:
    proxy_port, handler = tampering_entrypoint
    with VirtualSite(SiteOptions(virtual_set.out, virtual_set.keys, tmp_path / "site", cache=virtual_set.cache,
                                 http_entrypoint_port=proxy_port)) as site:
        assert site.server is not None
        handler.upstream = site.server.port
        _check_tampered(site, local_os)


def _check_tampered(site: VirtualSite, local_os: Path) -> None:
    enforced = site.enroll("dc:a6:32:00:00:02")
    result, log = _boot(site, enforced, sd=local_os, name="tampered-enforced")
    assert not result.ok  # type: ignore[attr-defined]
    assert "after 2 restarts" in result.reason  # type: ignore[attr-defined]
    assert sum("SHA-256 mismatch" in line for line in log) == 3
    assert not any("Starting Linux" in line or "Boot mode: SD" in line for line in log)

    site.enroll("dc:a6:32:00:00:03")
    _nodes(site, "set-mode", "dc:a6:32:00:00:03", "permissive")
    permissive = site.fetch_eeprom("dc:a6:32:00:00:03")
    result, log = _boot(site, permissive, sd=local_os, marker=LOCAL_OS_MARKER, name="tampered-permissive")
    assert result.ok, (result.reason, result.console[-2000:])  # type: ignore[attr-defined]
    assert result.mode == "sd"  # type: ignore[attr-defined]
    assert any("SHA-256 mismatch" in line for line in log)
    assert "walt-vpn: starting" not in result.console  # type: ignore[attr-defined]


def test_revoked_node_refused_over_http_and_ssh(virtual_set: VirtualSet, site_factory: Callable[..., VirtualSite],
                                                tmp_path: Path) -> None:
    site = site_factory(mode="permissive")
    mac = "dc:a6:32:00:00:04"
    eeprom = site.enroll(mac)  # flashed before the revocation: the node still holds its credentials
    _nodes(site, "revoke", "--yes", mac)
    with pytest.raises(SiteHttpError) as refused:
        site.get("node/dca632000004/boot.img")
    assert refused.value.code == 403
    # Its SD card carries the same VPN boot files: the node gets as far as SSH, which refuses it.
    card = tmp_path / "vpn-card"
    card.mkdir()
    for name, data in read_all((virtual_set.out / "bootimg" / "boot.img").read_bytes()).items():
        (card / name).write_bytes(data)
    result, log = _boot(site, eeprom, sd=card, name="revoked", extra_cmdline=FAST_FAIL,
                        marker=r"walt-vpn: .*giving up after 2 attempts")
    assert any("HTTP 403" in line for line in log)
    console = result.console  # type: ignore[attr-defined]
    assert "refused the node certificate (revoked, expired or wrong principal)" in console
    assert MARKER not in console


def test_mode_switch_changes_digest_and_boot_order(site_factory: Callable[..., VirtualSite]) -> None:
    site = site_factory()
    mac = "dc:a6:32:00:00:05"
    site.enroll(mac)
    before = site.get("node/dca632000005/eeprom-digest", mac=mac).decode().strip()
    _nodes(site, "set-mode", mac, "permissive")
    after = site.get("node/dca632000005/eeprom-digest", mac=mac).decode().strip()
    assert before != after
    eeprom = site.fetch_eeprom(mac)
    assert hashlib.sha256(eeprom.read_bytes()).hexdigest() == after
    assert _bootconf(eeprom)["BOOT_ORDER"] == "0xf127"
    result, log = _boot(site, eeprom, name="switched")
    assert result.ok, (result.reason, result.console[-2000:])  # type: ignore[attr-defined]
    assert log[0].startswith("BOOT_ORDER 0xf127: 7 2 1 f")
    assert "mode permissive" in result.console  # type: ignore[attr-defined]


def test_recovery_kit_resets_an_enforced_node(virtual_set: VirtualSet, site_factory: Callable[..., VirtualSite],
                                              tmp_path: Path) -> None:
    with tarfile.open(virtual_set.out / "recovery" / "rpi-5-sd-recovery.tar.gz") as tar:
        kit = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    conf = parse_bootconf(parse_image(kit["pieeprom.bin"]).read_file("bootconf.txt").decode())
    # HTTP boot from the server's walt-net address (the recipe's site) first, then TFTP, SD.
    assert conf["BOOT_ORDER"] == "0xf127"
    assert (conf["HTTP_HOST"], conf["HTTP_PORT"], conf["HTTP_PATH"]) == ("10.0.2.100", "8080", "walt-vpn/boot")
    assert not [key for key in conf if key.startswith("WALT_VPN_")]
    card = tmp_path / "recovery-card"
    card.mkdir()
    for name, data in kit.items():
        (card / name).write_bytes(data)
    site = site_factory()
    eeprom = site.enroll("dc:a6:32:00:00:06")
    assert "WALT_VPN_CREDS" in _bootconf(eeprom)
    result, _ = _boot(site, eeprom, sd=card, name="recover")
    assert result.ok and result.mode == "recovery"  # type: ignore[attr-defined]
    assert eeprom.read_bytes() == kit["pieeprom.bin"], "the node's flash now holds the kit's image"
