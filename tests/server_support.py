"""Support module (not a test module) for the server tests: artifact sets, configs, clients.

Everything runs on loopback: the server binds 127.0.0.1. The enrollment subnet is
127.0.0.0/9; each test node has its own source address there (`node_ip(mac)`, bound in
the config's `node_addresses` file); 127.0.0.1 (INSIDE) is on the subnet but bound to no
node; "outside the enrollment subnets" is 127.200.0.2 (OUTSIDE).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

INSIDE = "127.0.0.1"
OUTSIDE = "127.200.0.2"
SUBNETS = ["127.0.0.0/9"]
EXTRA_NODES = ("dca632aabbcc", "dca632123456", "001122334455", "dca632000077")


def mac12_of(mac: str) -> str:
    return mac.lower().replace(":", "").replace("-", "")


def node_ip(mac: str) -> str:
    """The loopback source address bound to a test node's MAC."""
    m = mac12_of(mac)
    return f"127.{1 if m.startswith('dca632') else 2}.{int(m[8:10], 16)}.{int(m[10:12], 16)}"


def bound_test_macs(count: int = 1024) -> list[str]:
    """MACs bound in the test config: dc:a6:32:00:00:00 + i, and a few others."""
    return [f"dca632{i:06x}" for i in range(count)] + list(EXTRA_NODES)


def write_node_addresses(path: Path, macs: list[str]) -> Path:
    path.write_text("# test nodes: MAC IP\n" + "".join(f"{m} {node_ip(m)}\n" for m in macs))
    return path
HOST_KEY_LINE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def make_artifacts(directory: Path, size: int = 3 * 1024 * 1024 + 17) -> Path:
    """A minimal build output: bootimg/boot.img (deterministic bytes), no boot.sig, no EEPROM."""
    boot = directory / "bootimg" / "boot.img"
    boot.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha256(b"fwbuild test boot.img").digest() * 4096
    with open(boot, "wb") as handle:
        written = 0
        while written < size:
            chunk = block[: size - written]
            handle.write(chunk)
            written += len(chunk)
    # A virtual-recipe set: nodes get the synthetic EEPROM base (a real set must carry its own).
    (directory / "manifest.json").write_text(json.dumps(
        {"source_date_epoch": 1700000000, "recipe": {"name": "test", "target": "virtual"}}))
    return directory


def write_config(path: Path, *, artifacts: Path, state: Path, keys: Path,
                 subnets: list[str] | None = None, port: int = 0, admin_port: int = 0,
                 ssh: str = "vpn.example.org:2222", host_keys: list[str] | None = None,
                 mode: str = "enforced", extra: str = "",
                 nodes: list[str] | None = None) -> Path:
    subnets = subnets if subnets is not None else SUBNETS
    if "node_addresses" not in extra:
        addresses = write_node_addresses(path.parent / "node-addresses.txt",
                                         nodes if nodes is not None else bound_test_macs())
        extra = f'node_addresses = "{addresses}"\n' + extra
    keys_list = host_keys if host_keys is not None else [HOST_KEY_LINE]
    path.write_text(f"""
[server]
listen = "127.0.0.1"
port = {port}
hostname = "walt-server"
artifacts = "{artifacts}"
state_dir = "{state}"
keys_dir = "{keys}"
default_boot_mode = "{mode}"
enrollment_subnets = {json.dumps(subnets)}
node_root = "/var/lib/walt/nodes/{{mac12}}/fs"
{extra}

[entrypoints]
http = "boot.example.org"
ssh = "{ssh}"
ssh_host_keys = {json.dumps(keys_list)}

[admin]
listen = "127.0.0.1"
port = {admin_port}
""")
    return path


def copy_keys(session_keys: Path, target: Path) -> Path:
    shutil.copytree(session_keys, target)
    return target


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def request(port: int, method: str, path: str, *, body: bytes | None = None,
            headers: dict[str, str] | None = None, source: str = INSIDE,
            timeout: float = 60) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def enroll(port: int, mac: str, pubkey: str | None = None, source: str | None = None) -> Reply:
    from urllib.parse import urlencode

    fields = {"mac": mac}
    if pubkey:
        fields["ssh-pubkey"] = pubkey
    return request(port, "POST", "/walt-vpn/enroll", body=urlencode(fields).encode(),
                   headers={"Content-Type": "application/x-www-form-urlencoded"},
                   source=source or node_ip(mac))


def raw_request(port: int, data: bytes, source: str = INSIDE, timeout: float = 30) -> Reply:
    """Send raw bytes (anything http.client would refuse) and parse the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if _complete(b"".join(chunks)):
                break
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(status, headers, body)


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def db_snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (to assert that a request changed nothing)."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
                for t in tables}
    finally:
        conn.close()


@pytest.fixture(name="server_env")
def server_env_fixture(tmp_path: Path, session_keys: Path) -> Iterator[dict[str, Path]]:
    """Paths of a fresh server setup (artifacts, keys copy, state, config)."""
    keys = copy_keys(session_keys, tmp_path / "keys")
    artifacts = make_artifacts(tmp_path / "out")
    config = write_config(tmp_path / "server.toml", artifacts=artifacts, state=tmp_path / "state",
                          keys=keys)
    yield {"root": tmp_path, "keys": keys, "artifacts": artifacts, "config": config,
           "state": tmp_path / "state"}


@pytest.fixture(name="running")
def running_fixture(server_env: dict[str, Path]) -> Iterator[Any]:
    """An in-process server on ephemeral loopback ports."""
    from server.config import load_config
    from server.run import start_server

    srv = start_server(load_config(server_env["config"]))
    try:
        yield srv
    finally:
        srv.stop()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def node_files(port: int, mac12: str, directory: Path) -> dict[str, Path]:
    """The node's SSH files (key, certificate, known_hosts), unpacked from WALT_VPN_CREDS in the
    pieeprom.bin the server renders for it (fetched from the node's own address)."""
    from fwbuild.eeprom.bootconf import parse_bootconf
    from fwbuild.eeprom.image import parse_image
    from server.certs import read_creds

    image = request(port, "GET", f"/walt-vpn/node/{mac12}/pieeprom.bin", source=node_ip(mac12))
    assert image.status == 200, image.text
    conf = parse_bootconf(parse_image(image.body).read_file("bootconf.txt").decode())
    directory.mkdir()
    paths = {}
    for name, data in read_creds(conf["WALT_VPN_CREDS"]).items():
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        paths[name] = path
    return paths


def node_ssh(files: dict[str, Path], port: int) -> subprocess.CompletedProcess[str]:
    """`ssh ... true` to the test sshd on 127.0.0.1:`port` with the node's files, host key pinned."""
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", str(files["id_ed25519"]),
         "-o", f"CertificateFile={files['id_ed25519-cert.pub']}", "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={files['known_hosts']}",
         "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
         "-o", "ConnectTimeout=30", "-p", str(port), "root@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=120, check=False)


def write_ca_sshd_config(directory: Path, *, port: int, hostkey: Path, ca_pub: Path,
                         revoked_keys: Path, extra: str = "") -> Path:
    """An sshd_config (in `directory`) that lets in `root` with a certificate of the CA `ca_pub`
    for principal walt-vpn, refusing the keys in `revoked_keys`: how a site's sshd trusts nodes.
    `extra`: more sshd_config lines."""
    principals = directory / "principals"
    principals.mkdir()
    (principals / "root").write_text("walt-vpn\n")
    sshd_config = directory / "sshd_config"
    sshd_config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {hostkey}
PidFile none
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile none
TrustedUserCAKeys {ca_pub}
AuthorizedPrincipalsFile {principals}/%u
RevokedKeys {revoked_keys}
LogLevel VERBOSE
{extra}""")
    return sshd_config


def wait_listening(port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 60) -> None:
    """Wait until 127.0.0.1:`port` accepts a connection; fail if `proc` (`what`) exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            assert proc.poll() is None, f"{what} exited before listening"
            assert time.monotonic() < deadline, f"{what} never listened"
            time.sleep(0.2)
