"""Coming from WalT (issue 12): `fwbuild import-walt` takes WalT's VPN CA (ECDSA P-521),
HTTP-boot key and node table; a certificate WalT signed before the import logs in to the
real sshd after it, and revoking that node locks it out."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from fwbuild.keys import KeyPaths, describe_keys, load_ssh_ca
from fwbuild.virtual.sshd import TestSshd
from tests.initramfs.test_vpnboot import SFTP_INIT, SFTP_VERSION
from tests.server_support import copy_keys, make_artifacts, write_config

MAC_A, MAC_B = "dc:a6:32:aa:bb:cc", "dc:a6:32:12:34:56"


def keygen(*args: str) -> None:
    subprocess.run(["ssh-keygen", "-q", *args], check=True, capture_output=True)


@pytest.fixture
def walt(tmp_path: Path) -> dict[str, Path]:
    """What an admin copies off a WalT server, made the way WalT makes it."""
    d = tmp_path / "walt"
    d.mkdir()
    keygen("-t", "ecdsa", "-b", "521", "-N", "", "-f", str(d / "vpn-ca-key"))  # setup/vpn.py
    subprocess.run(["openssl", "genrsa", "-out", str(d / "private.pem"), "2048"], check=True,
                   capture_output=True)
    rows = ["mac,vpnmac,pubkeycert,revoked"]
    for mac, vpn, revoked in ((MAC_A, "52:54:00:00:00:07", "f"),
                              (MAC_B, "52:54:00:00:00:09", "t")):
        key = d / f"node-{mac.replace(':', '')}"
        keygen("-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key))  # made on the node
        keygen("-s", str(d / "vpn-ca-key"), "-I", f"vpn_{mac.replace(':', '')}", "-n", "walt-vpn",
               str(key) + ".pub")
        rows.append(f"{mac},{vpn},{Path(str(key) + '-cert.pub').read_text().strip()},{revoked}")
    (d / "walt-vpn-nodes.csv").write_text("\n".join(rows) + "\n")
    return d


@pytest.fixture
def site(tmp_path: Path, session_keys: Path) -> dict[str, Path]:
    keys = copy_keys(session_keys, tmp_path / "keys")
    sshd_dir = tmp_path / "sshd"
    config = write_config(tmp_path / "server.toml", artifacts=make_artifacts(tmp_path / "out"),
                          state=tmp_path / "state", keys=keys,
                          extra=f'revoked_keys_file = "{sshd_dir / "revoked_keys"}"\n')
    return {"keys": keys, "config": config, "sshd": sshd_dir}


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def import_args(walt: dict[str, Path] | Path, site: dict[str, Path], *extra: str) -> list[str]:
    assert isinstance(walt, Path)
    return ["import-walt", "--ca", str(walt / "vpn-ca-key"), "--http-boot-key",
            str(walt / "private.pem"), "--nodes", str(walt / "walt-vpn-nodes.csv"),
            "--config", str(site["config"]), *extra]


def test_import_replaces_keys_only_with_force_then_changes_nothing(
        walt: Path, site: dict[str, Path]) -> None:
    before = describe_keys(site["keys"])
    refused = run(*import_args(walt, site))
    assert refused.exit_code != 0
    assert "differ from WalT's" in refused.output and "--force" in refused.output
    assert describe_keys(site["keys"]) == before  # nothing replaced
    first = run(*import_args(walt, site, "--force", "--json"))
    assert first.exit_code == 0, first.output
    report = json.loads(first.output)
    assert report["nodes_added"] == [MAC_A, MAC_B] and len(report["keys_replaced"]) == 2
    ca = load_ssh_ca(KeyPaths(site["keys"]).ssh_ca)
    assert ca.public_key().curve.name == "secp521r1"  # type: ignore[union-attr]
    second = run(*import_args(walt, site, "--json"))
    assert second.exit_code == 0, second.output
    again = json.loads(second.output)
    assert again["nodes_added"] == [] and again["nodes_unchanged"] == [MAC_A, MAC_B]
    assert again["keys_replaced"] == []
    shown = run("nodes", "show", MAC_A, "--json", "--config", str(site["config"]))
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    assert info["vpn_mac"] == "52:54:00:00:00:07" and info["state"] == "enrolled"
    assert info["certificate"]["server_generated_key"] is False
    assert info["certificate"]["key_id"] == "vpn_dca632aabbcc"
    revoked = json.loads(run("nodes", "show", MAC_B, "--json", "--config",
                             str(site["config"])).output)
    assert revoked["state"] == "revoked"
    # A fresh enrollment after the import takes the next VPN MAC, not an imported one.
    from server.config import load_config
    from server.service import Service

    service = Service(load_config(site["config"]))
    try:
        assert service.enroll("dc:a6:32:00:00:01").vpn_mac == "52:54:00:00:00:0a"
    finally:
        service.close()


def test_import_refuses_a_certificate_of_another_ca(walt: Path, site: dict[str, Path],
                                                    tmp_path: Path) -> None:
    keygen("-t", "ecdsa", "-b", "521", "-N", "", "-f", str(tmp_path / "other-ca"))
    result = run(*import_args(walt, site, "--force")[:2], str(tmp_path / "other-ca"),
                 *import_args(walt, site, "--force")[3:])
    assert result.exit_code != 0
    assert "is not signed by this CA" in result.output and "line 2" in result.output
    assert not (site["keys"] / "ssh-ca.pub").read_text().endswith("walt-vpn-ca\n")


@pytest.fixture
def sshd_after_import(walt: Path, site: dict[str, Path]) -> Iterator[TestSshd]:
    if os.geteuid() != 0:
        pytest.skip("the test sshd needs root")
    result = run(*import_args(walt, site, "--force"))
    assert result.exit_code == 0, result.output
    server = TestSshd(site["sshd"], ca_public_key=(site["keys"] / "ssh-ca.pub").read_text())
    with server:
        yield server


def _login(walt: Path, sshd: TestSshd, mac12: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line("127.0.0.1"))
    key = walt / f"node-{mac12}"
    return subprocess.run(
        ["ssh", "-i", str(key), "-o", f"CertificateFile={key}-cert.pub", "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30",
         "-p", str(sshd.port), "walt-vpn@127.0.0.1", "/usr/lib/openssh/sftp-server"],
        input=SFTP_INIT, capture_output=True, text=True, encoding="latin-1", timeout=120,
        check=False)


@pytest.mark.slow
def test_walt_certificate_logs_in_after_import_and_revocation_works(
        walt: Path, site: dict[str, Path], sshd_after_import: TestSshd, tmp_path: Path) -> None:
    ok = _login(walt, sshd_after_import, "dca632aabbcc", tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout[4:9] == SFTP_VERSION
    # Revoked in WalT's table: refused from the start.
    assert _login(walt, sshd_after_import, "dca632123456", tmp_path).returncode == 255
    revoke = run("nodes", "revoke", MAC_A, "--yes", "--config", str(site["config"]))
    assert revoke.exit_code == 0, revoke.output
    refused = _login(walt, sshd_after_import, "dca632aabbcc", tmp_path)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
