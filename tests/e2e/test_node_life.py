"""Issue 11, the node side: the node enrolls itself, flashes itself, re-flashes on every change.

QEMU (the virtual Pi 5), a real OpenSSH entrypoint with the SSH gate, the server in
process. The harness only powers nodes on, inserts the recovery card and plays the admin;
every assertion reads the node's console, its SPI flash file or the server's events.
Waits are on console markers with generous ceilings (the tests run on a loaded machine).
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa

from fwbuild.cli import main
from fwbuild.eeprom.assemble import assemble_eeprom
from fwbuild.eeprom.synthetic import synthetic_image
from fwbuild.virtual.rootfs import MARKER
from fwbuild.virtual.sshd import free_port
from server.virtual_demo import FLASHED, Life, insert_recovery_card, power_until_root
from server.virtual_site import SiteOptions, VirtualNode, VirtualSite
from tests.conftest import VirtualSet

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the site's sshd needs root"),
]

ROOT = Path(__file__).resolve().parents[2]
FAST_FAIL = "walt_vpn.retries=2 walt_vpn.backoff=1"
REFUSED = "walt-vpn: flash: image refused, not flashed: "

@pytest.fixture
def site_factory(virtual_set: VirtualSet, tmp_path: Path) -> Iterator[Callable[..., VirtualSite]]:
    sites: list[VirtualSite] = []

    def start(**options: Any) -> VirtualSite:
        site = VirtualSite(SiteOptions(virtual_set.out, virtual_set.keys, tmp_path / f"site{len(sites)}",
                                       cache=virtual_set.cache, **options))
        sites.append(site)
        site.start()
        return site

    yield start
    for site in sites:
        site.stop()


def _lines(console: str) -> list[str]:
    return [line.strip() for line in console.splitlines() if line.startswith("walt-vpn: ")]


def _recovered(site: VirtualSite, mac: str, virtual_set: VirtualSet) -> VirtualNode:
    """A node whose flash holds the recovery EEPROM (as the recovery card leaves it)."""
    recovery = (virtual_set.out / "eeprom" / "recovery" / "pieeprom.bin").read_bytes()
    return site.add_node(mac, flash=recovery)


def test_demo_whole_life_self_enrollment_and_two_self_flashes(
        virtual_set: VirtualSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fwbuild virtual-node demo --json`, as a user runs it; then `fwbuild nodes show`."""
    monkeypatch.setenv("FWBUILD_CACHE", str(virtual_set.cache.root))
    mac, work = "dc:a6:32:00:01:01", tmp_path / "demo"
    result = CliRunner().invoke(main, [
        "virtual-node", "demo", "--json", "--recipe", str(ROOT / "recipes" / "virtual.toml"),
        "--out", str(virtual_set.out.parent), "--keys", str(virtual_set.keys), "--work", str(work), "--mac", mac])
    assert result.exit_code == 0, result.output[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {
        "enrolled_by": "node",
        "flashes": [{"reason": "enrollment", "mode": "enforced"}, {"reason": "boot mode", "mode": "permissive"}],
        "boots": [{"via": "ssh entrypoint 10.0.2.100:22", "mode": mode, "reached": True}
                  for mode in ("enforced", "permissive")]}
    # QEMU ran four times (the recovery card's power-on stops in the ROM's recovery.bin)
    runs = sorted((work / "runs").iterdir(), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    consoles = [(run / "console.log").read_text(errors="replace") for run in runs]
    first, enforced, reflash, permissive = consoles
    assert f"walt-vpn: enroll: the server enrolled this node ({mac})" in first
    assert FLASHED in first and MARKER not in first
    assert "nothing to flash" in enforced and MARKER in enforced
    assert FLASHED in reflash and "walt-vpn: flash: the server expects EEPROM sha256" in reflash
    assert "mode permissive" in permissive and "nothing to flash" in permissive and MARKER in permissive
    # The server saw the node enroll itself from its bound address (127.0.0.10, the demo's
    # only node), then its two image fetches (walt-net HTTP, then the SSH gate) with the
    # admin's mode change between them.
    shown = CliRunner().invoke(main, ["nodes", "show", mac, "--json", "--config", str(work / "server.toml")])
    assert shown.exit_code == 0, shown.output
    events = [(e["artifact"], e["result"], e["client"]) for e in reversed(json.loads(shown.stdout)["events"])]
    enroll = events.index(("enroll", "enrolled", "127.0.0.10"))
    fetches = [i for i, e in enumerate(events) if e[0] == "pieeprom.bin" and e[1] == "200"]
    mode_change = events.index(("boot-mode", "permissive", "admin"))
    assert len(fetches) == 2 and enroll < fetches[0] < mode_change < fetches[1], events
    assert events[fetches[0]][2] == "127.0.0.10"
    flash = (work / "nodes" / "dca632000101" / "pieeprom.bin").read_bytes()
    assert hashlib.sha256(flash).hexdigest() == json.loads(shown.stdout)["eeprom_digest"]


def test_entrypoint_change_reflashes_and_comes_back_through_the_new_port(
        site_factory: Callable[..., VirtualSite], virtual_set: VirtualSet) -> None:
    site = site_factory()
    node = _recovered(site, "dc:a6:32:00:01:02", virtual_set)
    life = Life()
    assert power_until_root(site, node, life).ok
    assert "authenticated to 10.0.2.100:22 " in life.results[-1].console
    site.restart_server(ssh_port=2222)  # [entrypoints] ssh = "10.0.2.100:2222"
    assert power_until_root(site, node, life).ok, life.results[-1].reason
    assert [f["reason"] for f in life.flashes] == ["enrollment", "entrypoint"]
    assert life.boots[-1]["via"] == "ssh entrypoint 10.0.2.100:2222"


def test_matching_digest_flashes_nothing(site_factory: Callable[..., VirtualSite], virtual_set: VirtualSet) -> None:
    site = site_factory()
    node = _recovered(site, "dc:a6:32:00:01:03", virtual_set)
    assert power_until_root(site, node, Life()).ok
    flash = node.flash.read_bytes()
    result = site.power_on(node)
    assert result.ok, result.reason
    lines = _lines(result.console)
    assert any("the running EEPROM is the one the server expects" in line and "nothing to flash" in line
               for line in lines)
    assert not any("flash: step" in line for line in lines)
    assert node.flash.read_bytes() == flash


def test_server_unreachable_at_boot_costs_one_line_and_the_node_still_boots(
        site_factory: Callable[..., VirtualSite], virtual_set: VirtualSet) -> None:
    site = site_factory()
    node = _recovered(site, "dc:a6:32:00:01:04", virtual_set)
    assert power_until_root(site, node, Life()).ok
    flash = node.flash.read_bytes()
    site.stop_admin_api()  # boot files still served; the gate's server side is gone
    result = site.power_on(node, extra_cmdline=FAST_FAIL)
    assert result.ok, result.reason
    failed = [line for line in _lines(result.console) if "the SSH gate's eeprom-digest failed" in line]
    assert len(failed) == 3 and failed[-1].endswith("booting with the current EEPROM (attempt 3/3)"), failed
    assert node.flash.read_bytes() == flash


def test_power_cut_mid_flash_next_power_on_still_boots(site_factory: Callable[..., VirtualSite],
                                                       virtual_set: VirtualSet) -> None:
    """Killed while partition A is rewritten: the next power-on runs partition B's copy."""
    site = site_factory()
    node = _recovered(site, "dc:a6:32:00:01:05", virtual_set)
    cut = site.power_on(node, power_cut=r"walt-vpn: flash: paused after step 4",
                        extra_cmdline="walt_vpn.flash_pause=4")
    assert cut.power_cut, cut.reason
    log: list[str] = []
    site.log = log.append
    life = Life()
    result = power_until_root(site, node, life)
    assert result.ok, result.reason
    assert any("partition A is not valid" in line for line in log), log
    assert hashlib.sha256(node.flash.read_bytes()).hexdigest() == \
        site.get(f"node/{node.mac12}/eeprom-digest", mac=node.mac).decode().strip()


# ---- bad answers on the first boot: a hostile or broken walt-net ---------------------------

class _WaltNetProxy(http.server.BaseHTTPRequestHandler):
    """Between the node and the server on walt-net; keeps the node's source address."""

    upstream = 0
    mode = "honest"
    other_image = b""

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self, method: str) -> tuple[int, bytes]:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=60,
                                          source_address=(self.client_address[0], 0))
        headers = {"Content-Type": self.headers.get("Content-Type", "")} if body is not None else {}
        conn.request(method, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, data

    def _answer(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        self._answer(*self._forward("POST"))

    def do_GET(self) -> None:
        status, data = self._forward("GET")
        name = self.path.rsplit("/", 1)[-1]
        if name == "pieeprom.bin" and status == 200:
            if self.mode == "wrong-digest":
                data = data[:0x180000] + bytes([data[0x180000] ^ 1]) + data[0x180001:]
            elif self.mode == "truncated":
                data = data[:len(data) // 2]
            elif self.mode == "garbage":
                data = os.urandom(len(data))
            elif self.mode == "other-key":
                data = self.other_image
            elif self.mode == "http-500":
                status, data = 500, b"internal error\n"
        if name == "eeprom-digest" and self.mode == "other-key":
            data = hashlib.sha256(self.other_image).hexdigest().encode() + b"\n"
        if name == "eeprom-digest" and self.mode == "http-403":
            status, data = 403, b"forbidden\n"
        self._answer(status, data)


@pytest.fixture
def walt_net_proxy() -> Iterator[tuple[int, type[_WaltNetProxy]]]:
    handler = type("Handler", (_WaltNetProxy,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], handler
    httpd.shutdown()


@pytest.mark.parametrize(("mode", "line"), [
    ("wrong-digest", REFUSED + "sha256 "),
    ("other-key", REFUSED + "its pubkey.bin is not the boot key this node booted with"),
    ("truncated", REFUSED + "not a 2712 EEPROM image: image is 1048576 bytes"),
    ("garbage", REFUSED + "not a 2712 EEPROM image: bad section magic"),
    ("http-500", "walt-vpn: flash: fetching pieeprom.bin failed (server returned error: HTTP/1.0 500"),
    ("http-403", "walt-vpn: flash: fetching eeprom-digest failed (server returned error: HTTP/1.0 403"),
    ("unreachable", "walt-vpn: enroll: http://10.0.2.100:8080/walt-vpn/enroll failed"),
])
def test_first_boot_bad_answers_never_flash(site_factory: Callable[..., VirtualSite], virtual_set: VirtualSet,
                                            walt_net_proxy: tuple[int, type[_WaltNetProxy]],
                                            mode: str, line: str) -> None:
    proxy_port, handler = walt_net_proxy
    target = ("127.0.0.1", free_port() if mode == "unreachable" else proxy_port)
    site = site_factory(walt_net_target=target)
    assert site.server is not None
    handler.upstream = site.server.port
    handler.mode = mode
    if mode == "other-key":
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        handler.other_image = assemble_eeprom(synthetic_image(), "[all]\nBOOT_ORDER=0xf7\n",
                                              boot_key=other, timestamp=1)
    node = _recovered(site, "dc:a6:32:00:01:06", virtual_set)
    recovery = node.flash.read_bytes()
    result = site.power_on(node, extra_cmdline=FAST_FAIL, timeout=400)
    assert result.exit_status == 0, result.reason  # gave up, rebooted (enforced fallback)
    lines = _lines(result.console)
    failures = [text for text in lines if text.startswith(line)]
    assert len(failures) == 2, lines  # one line per attempt (retries=2), then the fallback
    assert lines[-1].endswith("giving up after 2 attempts: rebooting (enforced mode)"), lines
    assert not any("flash: step" in text for text in lines)
    assert node.flash.read_bytes() == recovery, "nothing was flashed"
    if mode == "garbage":
        # the recovery EEPROM still works: with an honest walt-net the node enrolls and flashes
        handler.mode = "honest"
        assert power_until_root(site, node, Life()).ok


def test_recovery_card_then_first_boot_from_a_factory_flash(site_factory: Callable[..., VirtualSite],
                                                            virtual_set: VirtualSet) -> None:
    site = site_factory()
    node = site.add_node("dc:a6:32:00:01:07")  # a factory EEPROM: SD/USB/NVMe, no pubkey.bin
    card = insert_recovery_card(virtual_set.out, site.options.work / "card")
    assert site.power_on(node, sd=card).mode == "recovery"
    assert node.flash.read_bytes() == (virtual_set.out / "eeprom" / "recovery" / "pieeprom.bin").read_bytes()
    result = site.power_on(node)
    assert FLASHED in result.console and result.exit_status == 0, result.reason


def test_walt_net_identity_is_bound_to_the_address(site_factory: Callable[..., VirtualSite]) -> None:
    """The minimal contract routes: a walt-net host gets its own node's secrets only."""
    site = site_factory()
    alice, mallory = site.add_node("dc:a6:32:00:02:01"), site.add_node("dc:a6:32:00:02:02")
    status, _ = site.request("POST", "enroll", body=b"", source=alice.address)
    assert status == 201  # no MAC named: the address says who it is
    assert site.server is not None
    before = site.server.service.describe(site.server.service.node(alice.mac))
    for method, path, body in [
            ("POST", "enroll", f"mac={alice.mac}".encode()),
            ("GET", f"node/{alice.mac12}/pieeprom.bin", None),
            ("GET", f"node/{alice.mac12}/eeprom-digest", None)]:
        status, answer = site.request(method, path, body=body, source=mallory.address)
        assert status == 403, (path, answer)
    status, answer = site.request("GET", f"node/{alice.mac12}/pieeprom.bin", source="127.0.0.99")
    assert status == 403 and b"no node is bound to address 127.0.0.99" in answer
    assert site.server.service.describe(site.server.service.node(alice.mac)) == before
    status, image = site.request("GET", f"node/{alice.mac12}/pieeprom.bin", source=alice.address)
    assert status == 200 and len(image) == 2 * 1024 * 1024
    status, boot = site.request("GET", "boot/boot.sig", source="127.0.0.99")
    assert status == 200 and boot.startswith(hashlib.sha256((site.options.artifacts / "bootimg" / "boot.img")
                                                            .read_bytes()).hexdigest().encode())
