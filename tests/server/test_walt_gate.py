"""WalT's anti-relay check-in (issue 12): `ssh walt-vpn@server check-in-walt-net` answers
`OK` only when the SSH client address is inside walt-net (the enrollment subnets), through
the real sshd and the SSH gate; the admin API answer it relies on. A node enrolled by
WalT's own client (its own key) through the gate: no EEPROM to compare (exit 3, seen as a
409 event), and SFTP starts in its own root (a WalT-written EEPROM names no root path)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from fwbuild.eeprom.bootconf import parse_bootconf
from fwbuild.eeprom.image import parse_image
from fwbuild.eeprom.synthetic import synthetic_image
from tests.server.test_gate_sshd import MAC_A, A, Site, _sftp, _ssh, pytestmark  # noqa: F401 - skip marks
from tests.server.test_gate_sshd import site as site_fixture  # noqa: F401 - the `site` fixture
from tests.server.test_walt_protocol import walt_enroll
from tests.server.test_walt_replay import (
    WaltClient,
    check_keyscan,
    hashed_lines,
    keyscan_server_walt,
    names,
    read_creds_tar,
)
from tests.server_support import (  # noqa: F401 - fixtures
    OUTSIDE,
    node_ip,
    request,
    running_fixture,
    server_env_fixture,
)


def test_check_in_from_walt_net_is_ok(site_fixture: Site) -> None:  # noqa: F811
    result = _ssh(site_fixture.creds[A], "node", "check-in-walt-net")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"OK\n"


def test_check_in_from_outside_walt_net_fails(site_fixture: Site) -> None:  # noqa: F811
    """The same certificate and host key, from an address off walt-net (a relay)."""
    result = _ssh(site_fixture.creds[A], "-b", OUTSIDE, "node", "check-in-walt-net")
    assert result.returncode == 1, result.stderr
    assert result.stdout == b"FAILED -- NOT in walt network\n"


@pytest.mark.parametrize(("ip", "inside"), [("127.1.0.10", True), (OUTSIDE, False),
                                            ("::ffff:127.0.0.1", True)])
def test_admin_walt_net_answer(running: Any, ip: str, inside: bool) -> None:
    reply = request(running.admin_port, "GET", f"/api/walt-net?ip={ip}")
    assert reply.status == 200 and reply.json()["inside"] is inside


def test_admin_walt_net_bad_address(running: Any) -> None:
    reply = request(running.admin_port, "GET", "/api/walt-net?ip=nope")
    assert reply.status == 400 and "not an IP address" in reply.json()["error"]


def _walt_node(site: Site) -> Path:
    """Node A re-enrolled by WalT's client (its own ecdsa-384 key): an ssh_config for it."""
    directory = site.tmp / "walt-node"
    directory.mkdir()
    key = directory / "id_walt_vpn"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)],
                   check=True)
    enrolled = walt_enroll(site.port, Path(f"{key}.pub").read_text(), source=node_ip(A))
    assert (enrolled.status, enrolled.body) == (200, b"OK\n")
    cert = request(site.port, "GET", "/walt-vpn/node-conf/ssh-pubkey-cert", source=node_ip(A))
    assert cert.status == 200
    (directory / "id_walt_vpn-cert.pub").write_bytes(cert.body)
    config = directory / "ssh_config"
    config.write_text(site.creds[A].read_text().replace(
        str(site.creds[A].parent / "id_ed25519"), str(key)))
    assert str(key) in config.read_text()
    return config


def test_walt_node_gate_has_no_eeprom_and_serves_its_root(site_fixture: Site) -> None:  # noqa: F811
    config = _walt_node(site_fixture)
    digest = _ssh(config, "node", "eeprom-digest")
    assert digest.returncode == 3 and digest.stdout == b"", digest.stderr
    assert digest.stderr.decode() == (f"walt-vpn: node {A} enrolled with its own key: the server "
                                      "renders no EEPROM for it (its own client writes it)\n")
    image = _ssh(config, "node", "eeprom-image")
    assert image.returncode == 3 and image.stdout == b""
    # Seen through its certificate all the same (the event a distant node shows up by).
    shown = CliRunner().invoke(main, ["nodes", "show", MAC_A, "--json", "--config",
                                      str(site_fixture.tmp / "server.toml")])
    assert shown.exit_code == 0, shown.output
    events = [(e["artifact"], e["result"], e["client"]) for e in json.loads(shown.output)["events"]]
    assert ("eeprom-digest", "409", "ssh-gate") in events, events
    # No root path needed: SFTP starts in the node's own root (what sshfs `host:` mounts).
    out = site_fixture.tmp / "got"
    listing = _sftp(config, "pwd", "ls -1", f"get etc/hostname {out}")
    assert listing.returncode == 0, listing.stderr
    assert f"Remote working directory: {site_fixture.roots / A}" in listing.stdout
    assert "big.bin" in listing.stdout and "secret" not in listing.stdout
    assert out.read_text() == f"node-{A}\n"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is missing")
def test_walt_client_keyscan_of_server_walt(site_fixture: Site) -> None:  # noqa: F811
    """WalT's client appends `ssh-keyscan -H server.walt` to the node's known_hosts: replayed
    against the real sshd (server.walt -> 127.0.0.1 for that one process, /etc/hosts
    untouched); its lines carry the keys node-conf's host-keys answer serves."""
    work = site_fixture.tmp / "walt-client"
    work.mkdir()
    flash = work / "spi-flash.bin"
    flash.write_bytes(synthetic_image())
    scanned: list[bytes] = []

    def keyscan() -> bytes:
        scanned.append(keyscan_server_walt(site_fixture.sshd.port, work))
        return scanned[-1]

    client = WaltClient(site_fixture.port, work, flash, source=node_ip(A), keyscan=keyscan)
    assert client.run(1) is True
    assert len(scanned) == 1
    check_keyscan(client, scanned[0], site_fixture.sshd.port)
    conf = parse_bootconf(parse_image(flash.read_bytes()).read_file("bootconf.txt").decode())
    known_hosts = read_creds_tar(str(conf["WALT_VPN_CREDS"]))["known_hosts"]
    # known_hosts = node-conf's host keys answer (the entrypoint), then the keyscan lines
    assert known_hosts.endswith(scanned[0])
    entrypoint_lines = hashed_lines(known_hosts[:-len(scanned[0])])
    assert entrypoint_lines and all(names(f"[127.0.0.1]:{site_fixture.sshd.port}", line)
                                    for line in entrypoint_lines)
