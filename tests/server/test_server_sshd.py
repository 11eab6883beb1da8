"""A certificate issued by the server is accepted by a real sshd (TrustedUserCAKeys) on
loopback, described by `ssh-keygen -L`, and refused after `fwbuild nodes revoke`.

The node's credentials are taken exactly where a node finds them: WALT_VPN_CREDS in the
bootconf of its pieeprom.bin (private key, certificate, pinned entrypoint host keys).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from tests.server_support import (
    copy_keys,
    enroll,
    make_artifacts,
    node_files,
    node_ssh,
    write_ca_sshd_config,
    write_config,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists(),
                       reason="needs openssh-server"),
    pytest.mark.skipif(os.geteuid() != 0, reason="sshd with its own config must run as root"),
]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
MAC = "dc:a6:32:12:34:56"
MAC12 = "dca632123456"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited: {proc.stderr.read() if proc.stderr else b''!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("sshd did not start listening")


@pytest.fixture
def setup(tmp_path: Path, session_keys: Path) -> Iterator[dict[str, Any]]:
    from server.config import load_config
    from server.run import start_server

    hostkey = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)],
                   check=True)
    ssh_port = _free_port()
    keys = copy_keys(session_keys, tmp_path / "keys")
    config_path = write_config(
        tmp_path / "server.toml", artifacts=make_artifacts(tmp_path / "out", 4096),
        state=tmp_path / "state", keys=keys, ssh=f"127.0.0.1:{ssh_port}",
        host_keys=[hostkey.with_suffix(".pub").read_text().strip()])
    config = load_config(config_path)
    sshd_config = write_ca_sshd_config(tmp_path, port=ssh_port, hostkey=hostkey,
                                       ca_pub=keys / "ssh-ca.pub", revoked_keys=config.revoked_keys_file)
    srv = start_server(config)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    with open(tmp_path / "sshd.log", "wb") as log:
        sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(sshd_config)], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            _wait_port(ssh_port, sshd)
            yield {"srv": srv, "config": config_path, "ssh_port": ssh_port, "tmp": tmp_path,
                   "sshd_log": tmp_path / "sshd.log", "ca_pub": keys / "ssh-ca.pub"}
        finally:
            sshd.terminate()
            sshd.wait(10)
            srv.stop()




def test_sshd_accepts_then_refuses_after_revoke(setup: dict[str, Any]) -> None:
    port = setup["srv"].port
    reply = enroll(port, MAC)
    assert reply.status == 201
    info = reply.json()
    files = node_files(port, MAC12, setup["tmp"] / "node")

    described = subprocess.run(["ssh-keygen", "-L", "-f", str(files["id_ed25519-cert.pub"])],
                               capture_output=True, text=True, check=True).stdout
    assert "user certificate" in described
    assert f'Key ID: "vpn_{MAC12}"' in described
    assert f"Serial: {info['serial']}" in described
    assert "Principals: \n                walt-vpn" in described
    ca_fp = subprocess.run(["ssh-keygen", "-l", "-f", str(setup["ca_pub"])], capture_output=True,
                           text=True, check=True).stdout.split()[1]
    assert ca_fp in described

    ok = node_ssh(files, setup["ssh_port"])
    assert ok.returncode == 0, ok.stderr

    result = CliRunner().invoke(main, ["nodes", "revoke", MAC, "--yes", "--config", str(setup["config"])])
    assert result.exit_code == 0, result.output
    refused = node_ssh(files, setup["ssh_port"])
    assert refused.returncode == 255
    assert "Permission denied" in refused.stderr
    assert b"revoked" in setup["sshd_log"].read_bytes()
