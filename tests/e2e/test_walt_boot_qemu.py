"""Issue 12, must show: a node whose EEPROM was written by WalT's own client boots, in the
virtual Pi 5, through `walt-vpn/per-ip/<a-b-c-d>` and our VPN initramfs to its root.

The replay client of test_walt_replay (walt-vpn-auto-enroll's steps, no `mac` anywhere)
runs from the node's walt-net address against the virtual site, including WalT's
`ssh-keyscan -H server.walt` against the site's real sshd (the name mapped for that one
process in a private mount namespace, /etc/hosts untouched). The EEPROM it writes names
no WALT_VPN_ROOT: the init mounts the root the SSH gate gives its certificate's node.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from fwbuild.eeprom.bootconf import parse_bootconf
from fwbuild.eeprom.image import parse_image
from fwbuild.virtual.rootfs import MARKER
from server.virtual_site import SiteOptions, VirtualSite
from tests.conftest import VirtualSet
from tests.server.test_walt_replay import (
    WaltClient,
    check_keyscan,
    keyscan_server_walt,
    read_creds_tar,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the site's sshd and unshare need root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is missing"),
]

MAC = "dc:a6:32:00:12:0c"
HTTP_ENTRYPOINT = ("walt-http.example.org", 80)  # WalT's http-entrypoint: a bare host, port 80


@pytest.fixture
def site(virtual_set: VirtualSet, tmp_path: Path) -> Iterator[tuple[VirtualSite, list[str]]]:
    log: list[str] = []
    options = SiteOptions(virtual_set.out, virtual_set.keys, tmp_path / "site", cache=virtual_set.cache,
                          http_entrypoint=HTTP_ENTRYPOINT)
    with VirtualSite(options, log=log.append) as running:
        yield running, log


def test_walt_written_eeprom_boots_through_per_ip_to_the_root(
        site: tuple[VirtualSite, list[str]], tmp_path: Path) -> None:
    running, log = site
    assert running.sshd is not None
    node = running.add_node(MAC)  # a factory EEPROM: no WALT_VPN_* values
    scanned: list[bytes] = []

    def keyscan() -> bytes:
        scanned.append(keyscan_server_walt(running.sshd.port, tmp_path))  # type: ignore[union-attr]
        return scanned[-1]

    client = WaltClient(running.port, tmp_path, node.flash, source=node.address, keyscan=keyscan)
    assert client.run(1) is True
    assert not any("?" in p or "/node/" in p or node.mac12 in p for p in client.paths)
    conf = parse_bootconf(parse_image(node.flash.read_bytes()).read_file("bootconf.txt").decode())
    assert conf["HTTP_HOST"] == HTTP_ENTRYPOINT[0] and "HTTP_PORT" not in conf
    assert conf["HTTP_PATH"] == "walt-vpn/per-ip/" + node.address.replace(".", "-")
    assert "WALT_VPN_ROOT" not in conf and "WALT_VPN_USER" not in conf
    # WalT's keyscan of server.walt, against the real sshd: the same keys as node-conf's
    # host keys answer, each line hashing its own name.
    check_keyscan(client, scanned[0], running.sshd.port)
    known_hosts = read_creds_tar(str(conf["WALT_VPN_CREDS"]))["known_hosts"]
    assert known_hosts.endswith(scanned[0])

    flash_before = node.flash.read_bytes()
    result = running.power_on(node, timeout=400.0)
    assert result.ok, (result.reason, result.console[-3000:])
    assert result.mode == "http"
    per_ip = f"http://{HTTP_ENTRYPOINT[0]}:80/{conf['HTTP_PATH']}/boot.sig"
    assert f"Boot mode: HTTP (7): {per_ip}" in log
    assert any("hash OK, RSA signature OK" in line for line in log)
    console = result.console
    assert ("walt-vpn: config: no WALT_VPN_ROOT (a WalT-written EEPROM): root = the SSH gate's "
            "root for this node") in console
    assert "authenticated to 10.0.2.100:22 as walt-vpn (certificate, pinned host key)" in console
    assert ("not checking the EEPROM" in console
            and "enrolled with its own key: the server renders no EEPROM" in console)
    assert "walt-vpn: root: mounted image root.img of the SSH gate's root for this node" in console
    assert MARKER in console
    assert node.flash.read_bytes() == flash_before  # its EEPROM stays WalT's
    assert client.run(2) is False  # the node OS's next run of WalT's client: nothing to change
    # The server saw it: the per-ip boot.img from its address, the gate's check by its certificate.
    shown = CliRunner().invoke(main, ["nodes", "show", MAC, "--json", "--config", str(running.config_path)])
    assert shown.exit_code == 0, shown.output
    events = {(e["artifact"], e["result"], e["client"]) for e in json.loads(shown.output)["events"]}
    assert ("eeprom-digest", "409", "ssh-gate") in events, events
    assert any(artifact == "boot.img" and result == "200" for artifact, result, _ in events), events
