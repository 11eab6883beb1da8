"""Our VPN initramfs reads an EEPROM config written by WalT's own client (issue 12):
WALT_VPN_CREDS holding `id_walt_vpn`, `id_walt_vpn-cert.pub`, `known_hosts` (the node's own
ecdsa-384 key), no WALT_VPN_ROOT / WALT_VPN_USER (documented defaults: the root is the one
the SSH gate gives the node), and a missing key in permissive mode falling back like any
permissive failure."""

from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fwbuild.virtual.sshd import TestSshd
from tests.initramfs.test_vpnboot import SFTP_VERSION, _ssh, needs_busybox, run_init_functions


@pytest.fixture
def sshd(tmp_path: Path, session_keys: Path) -> Iterator[TestSshd]:
    if os.geteuid() != 0:
        pytest.skip("the test sshd needs root")
    server = TestSshd(tmp_path / "sshd", ca_public_key=(session_keys / "ssh-ca.pub").read_text())
    with server:
        yield server


LO = 'first_interface() { echo lo; }\n'  # /sys/class/net/lo/address: 00:00:00:00:00:00


def walt_credentials(directory: Path, ca: Path, known_hosts: str) -> tuple[str, dict[str, bytes]]:
    """WALT_VPN_CREDS the way WalT's client packs it: base64(tar.gz) of id_walt_vpn (its own
    ecdsa-384 key), id_walt_vpn-cert.pub (`ssh-keygen -s CA -I vpn_<mac> -n walt-vpn`),
    known_hosts (`ssh-keyscan -H`)."""
    key = directory / "id_walt_vpn"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "vpn_dca632aabbcc", "-n",
                    "walt-vpn", str(key) + ".pub"], check=True)
    files = {"id_walt_vpn": key.read_bytes(),
             "id_walt_vpn-cert.pub": Path(str(key) + "-cert.pub").read_bytes(),
             "known_hosts": known_hosts.encode()}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(raw.getvalue()).decode(), files


WALT_CONFIG = ("BOOT_UART=1\nBOOT_ORDER=0xf7\nNET_INSTALL_ENABLED=0\nENABLE_SELF_UPDATE=0\n"
               "HTTP_HOST=walt-server.example.org\nHTTP_PATH=walt-vpn/per-ip/192-168-152-7\n"
               "DHCP_REQ_TIMEOUT=500\nWALT_VPN_MAC=52:54:00:00:00:07\n"
               "WALT_VPN_ENTRYPOINT=vpn.example.org\nWALT_VPN_BOOT_MODE={mode}\n"
               "WALT_VPN_CREDS=eA==\n")


@needs_busybox
def test_walt_written_config_takes_the_defaults(tmp_path: Path) -> None:
    result = run_init_functions(tmp_path, LO + 'parse_config; check_config; '
                                'echo "root=$CFG_WALT_VPN_ROOT user=$USER mode=$MODE '
                                'entry=$ENTRY_HOST:$ENTRY_PORT"',
                                stdin=WALT_CONFIG.format(mode="enforced"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        ("walt-vpn: config: no WALT_VPN_ROOT (a WalT-written EEPROM): root = the SSH gate's "
         "root for this node"),
        "root= user=walt-vpn mode=enforced entry=vpn.example.org:22"]
    # A recipe's vpn_root_default (a site path, {mac12} = the node's MAC) still applies.
    result = run_init_functions(tmp_path, LO + 'VPN_ROOT_DEFAULT=/srv/nodes/{mac12}/fs; parse_config; '
                                'check_config; echo "root=$CFG_WALT_VPN_ROOT"',
                                stdin=WALT_CONFIG.format(mode="enforced"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "walt-vpn: config: no WALT_VPN_ROOT (a WalT-written EEPROM): root /srv/nodes/000000000000/fs",
        "root=/srv/nodes/000000000000/fs"]


@needs_busybox
def test_gate_root_is_a_tree_or_its_one_image(tmp_path: Path) -> None:
    """No WALT_VPN_ROOT: what sshfs mounted from the gate's start directory is the root
    (a tree with /sbin/init) or holds the node's one image (as the gate lists an image root)."""
    tree, images, empty = tmp_path / "tree", tmp_path / "images", tmp_path / "empty"
    two = tmp_path / "two"
    (tree / "sbin").mkdir(parents=True)
    (tree / "boot.img").write_bytes(b"")  # a tree's files are not candidates
    images.mkdir()
    (images / "root.img").write_bytes(b"x")
    (images / "root.img.prefetch").write_bytes(b"x")
    empty.mkdir()
    two.mkdir()
    (two / "a.ext4").write_bytes(b"x")
    (two / "b.img").write_bytes(b"x")
    result = run_init_functions(tmp_path, "".join(
        f'echo "{d.name}=[$(gate_root_image {d})]"\n' for d in (tree, images, empty, two)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["tree=[]", "images=[root.img]", "empty=[]", "two=[a.ext4]"]
    assert "walt-vpn: root: several images in the gate's root, using a.ext4" in result.stderr


@needs_busybox
@pytest.mark.parametrize(("mode", "fallback"), [
    ("enforced", "rebooting (enforced mode)"),
    ("permissive", "dropping to a rescue shell (permissive mode)"),
])
def test_missing_key_falls_back_by_mode(tmp_path: Path, mode: str, fallback: str) -> None:
    text = WALT_CONFIG.format(mode=mode).replace("WALT_VPN_MAC=52:54:00:00:00:07\n", "")
    result = run_init_functions(tmp_path, LO + 'fallback() { echo FALLBACK; exit 0; }\n'
                                'parse_config; check_config; echo CONFIG-OK', stdin=text)
    assert result.stdout.splitlines() == [
        f"walt-vpn: config: WALT_VPN_MAC is missing: {fallback}", "FALLBACK"]


@needs_busybox
def test_walt_credentials_unpack_under_walts_names(tmp_path: Path, session_keys: Path) -> None:
    packed, files = walt_credentials(tmp_path, session_keys / "ssh-ca", "|1|x|y ssh-ed25519 AAAA\n")
    vpn = tmp_path / "vpn"
    (vpn / "etc" / "ssh").mkdir(parents=True)
    result = run_init_functions(tmp_path, f'VPN={vpn}; CFG_WALT_VPN_CREDS="$SECRET"; CTL=/x; '
                                'ENTRY_HOST=h; ENTRY_PORT=22; USER=walt-vpn; '
                                'unpack_credentials; write_ssh_config', env={"SECRET": packed})
    assert result.returncode == 0, result.stderr
    for name, data in files.items():
        path = vpn / "creds" / name
        assert path.read_bytes() == data and stat.S_IMODE(path.stat().st_mode) == 0o600
    config = (vpn / "etc" / "ssh" / "ssh_config").read_text()
    assert "IdentityFile /creds/id_walt_vpn\n" in config
    assert "CertificateFile /creds/id_walt_vpn-cert.pub\n" in config
    # Neither naming: one fatal line naming what is missing.
    broken = tmp_path / "broken"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("known_hosts")
        tar.addfile(info, io.BytesIO(b""))
    result = run_init_functions(tmp_path, f'VPN={broken}; CFG_WALT_VPN_CREDS="$SECRET"; '
                                'fallback() { echo FALLBACK; exit 0; }; unpack_credentials',
                                env={"SECRET": base64.b64encode(raw.getvalue()).decode()})
    assert result.stdout.splitlines()[0] == (
        "walt-vpn: config: WALT_VPN_CREDS lacks id_ed25519 (or id_walt_vpn, as WalT writes it): "
        "rebooting (enforced mode)")


@pytest.mark.slow
@needs_busybox
def test_walt_node_key_logs_in_to_a_real_sshd(tmp_path: Path, session_keys: Path,
                                               sshd: TestSshd) -> None:
    """The node's own ecdsa-384 key + certificate from a WalT-packed WALT_VPN_CREDS log in
    with the init's ssh options."""
    packed, _ = walt_credentials(tmp_path, session_keys / "ssh-ca",
                                 sshd.known_hosts_line("127.0.0.1"))
    vpn = tmp_path / "vpn"
    (vpn / "etc" / "ssh").mkdir(parents=True)
    result = run_init_functions(tmp_path, f'VPN={vpn}; CFG_WALT_VPN_CREDS="$SECRET"; '
                                f'CTL={tmp_path}/ctl; ENTRY_HOST=127.0.0.1; '
                                f'ENTRY_PORT={sshd.port}; USER=walt-vpn; '
                                'unpack_credentials; write_ssh_config', env={"SECRET": packed})
    assert result.returncode == 0, result.stderr
    config = vpn / "etc" / "ssh" / "ssh_config"
    config.write_text(config.read_text().replace("/creds/", f"{vpn}/creds/"))
    login = _ssh(config)
    assert login.returncode == 0, login.stderr
    assert login.stdout[4:9] == SFTP_VERSION


CHECK_IN_STUBS = ('ETMP={tmp}; VPN={tmp}; CTL={tmp}/ctl; chroot() {{ echo "chroot $*" >&2; }}\n'
                  'connect_ssh() {{ echo "reconnect tunnel=$WANT_TUNNEL"; }}\n'
                  'ssh_gate() {{ printf "{answer}" > "$2"; return {status}; }}\n'
                  'WANT_TUNNEL=0; check_in_walt_net; echo "tunnel=$WANT_TUNNEL"')


@needs_busybox
def test_enforced_node_on_walt_net_checks_in(tmp_path: Path) -> None:
    ok = run_init_functions(tmp_path, CHECK_IN_STUBS.format(tmp=tmp_path, answer="OK\\n",
                                                            status=0))
    assert ok.stdout.splitlines() == [
        "walt-vpn: network: on walt-net, confirmed by the server (check-in-walt-net): no tunnel",
        "tunnel=0"]
    refused = run_init_functions(tmp_path, CHECK_IN_STUBS.format(
        tmp=tmp_path, answer="FAILED -- NOT in walt network\\n", status=1))
    assert refused.stdout.splitlines() == [
        ("walt-vpn: network: the server did not confirm walt-net (FAILED -- NOT in walt "
         "network): using the tunnel"),
        "reconnect tunnel=1", "tunnel=1"]
