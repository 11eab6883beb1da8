"""A node certificate opens exactly three doors, checked against the real sshd (TestSshd)
with the authorized_keys line `fwbuild entrypoint ssh` generates and the real server:
the gate's commands, read-only SFTP of the node's own root, and (QEMU tests) the tunnel.
Everything else (a shell, `id`, -L/-R/-D, a pty, another node's files or image, a path
outside the root, a revoked certificate) is refused.

The node's credentials are the ones the server put in its pieeprom.bin (WALT_VPN_CREDS).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fwbuild.eeprom.bootconf import parse_bootconf
from fwbuild.eeprom.image import parse_image
from fwbuild.virtual.sshd import TestSshd, free_port, parse_sftp_log
from tests.server_support import (
    SUBNETS,
    copy_keys,
    enroll,
    make_artifacts,
    node_ip,
    request,
    wait_listening,
    write_node_addresses,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the test sshd needs root"),
    pytest.mark.skipif(shutil.which("ssh") is None or not Path("/usr/sbin/sshd").exists(),
                       reason="needs openssh-client and openssh-server"),
]

MAC_A, MAC_B = "dc:a6:32:00:00:0a", "dc:a6:32:00:00:0b"
A, B = "dca63200000a", "dca63200000b"


@dataclass
class Site:
    tmp: Path
    srv: object
    port: int
    admin_port: int
    sshd: TestSshd
    roots: Path
    creds: dict[str, Path]  # mac12 -> ssh_config for that node


def _node_config(tmp: Path, port: int, mac12: str, http_port: int, jump: int | None = None,
                 jump_known: str = "") -> Path:
    from server.certs import read_creds

    image = request(http_port, "GET", f"/walt-vpn/node/{mac12}/pieeprom.bin",
                    source=node_ip(mac12)).body
    conf = parse_bootconf(parse_image(image).read_file("bootconf.txt").decode())
    directory = tmp / f"node-{mac12}"
    directory.mkdir(exist_ok=True)
    for name, data in read_creds(conf["WALT_VPN_CREDS"]).items():
        (directory / name).write_bytes(data + (jump_known.encode() if name == "known_hosts" else b""))
        (directory / name).chmod(0o600)
    lines = ["Host node", "  HostName 127.0.0.1", f"  Port {port}", "  User walt-vpn"]
    if jump is not None:
        lines += ["  ProxyJump jump", "Host jump", "  HostName 127.0.0.1", f"  Port {jump}",
                  "  User walt-vpn"]
    lines += ["Host *", f"  IdentityFile {directory / 'id_ed25519'}",
              f"  CertificateFile {directory / 'id_ed25519-cert.pub'}", "  IdentitiesOnly yes",
              f"  UserKnownHostsFile {directory / 'known_hosts'}", "  GlobalKnownHostsFile /dev/null",
              "  StrictHostKeyChecking yes", "  BatchMode yes", "  ConnectTimeout 30",
              "  LogLevel ERROR", ""]
    config = directory / ("ssh_config" if jump is None else "ssh_config_jump")
    config.write_text("\n".join(lines))
    return config


@pytest.fixture
def site(tmp_path: Path, session_keys: Path) -> Iterator[Site]:
    from server.config import load_config
    from server.run import start_server
    from server.virtual_site import render_server_toml

    keys = copy_keys(session_keys, tmp_path / "keys")
    roots = tmp_path / "roots"
    for mac12 in (A, B):
        (roots / mac12 / "etc").mkdir(parents=True)
        (roots / mac12 / "etc" / "hostname").write_text(f"node-{mac12}\n")
    (roots / B / "secret").write_text("B's secret\n")
    (roots / A / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    os.symlink("/etc/passwd", roots / A / "passwd-abs")          # absolute escape
    os.symlink(f"../{B}/secret", roots / A / "to-b")             # relative escape
    os.symlink("etc/hostname", roots / A / "hostname-link")      # inside: fine
    sshd = TestSshd(tmp_path / "sshd", ca_public_key=(keys / "ssh-ca.pub").read_text(),
                    gate_root=str(roots) + "/{mac12}")
    admin_port = free_port()
    toml = render_server_toml({
        "server": {"listen": "127.0.0.1", "port": 0, "hostname": "walt-server",
                   "artifacts": str(make_artifacts(tmp_path / "out", 4096)),
                   "state_dir": str(tmp_path / "state"), "keys_dir": str(keys),
                   "default_boot_mode": "enforced", "enrollment_subnets": SUBNETS,
                   "node_addresses": str(write_node_addresses(tmp_path / "node-addresses.txt",
                                                              [MAC_A, MAC_B])),
                   "node_root": str(roots) + "/{mac12}", "revoked_keys_file": str(sshd.revoked)},
        "entrypoints": {"http": "boot.example.org", "ssh": f"127.0.0.1:{sshd.port}",
                        "ssh_host_keys": [sshd.host_public_key.strip()]},
        "admin": {"listen": "127.0.0.1", "port": admin_port},
    })
    (tmp_path / "server.toml").write_text(toml)
    srv = start_server(load_config(tmp_path / "server.toml"))
    sshd.set_gate(admin=f"http://127.0.0.1:{srv.admin_port}")
    try:
        with sshd:
            creds = {}
            for mac, mac12 in ((MAC_A, A), (MAC_B, B)):
                assert enroll(srv.port, mac).status == 201
                creds[mac12] = _node_config(tmp_path, sshd.port, mac12, srv.port)
            yield Site(tmp_path, srv, srv.port, srv.admin_port, sshd, roots, creds)
    finally:
        srv.stop()


def _ssh(config: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ssh", "-F", str(config), *args], input=stdin, capture_output=True,
                          timeout=120, check=False)


def _sftp(config: Path, *commands: str) -> subprocess.CompletedProcess[str]:
    batch = config.parent / "batch"
    batch.write_text("".join(c + "\n" for c in commands))
    return subprocess.run(["sftp", "-F", str(config), "-b", str(batch), "node"],
                          capture_output=True, text=True, timeout=120, check=False)


def _expected_digest(site: Site, mac12: str) -> str:
    return request(site.port, "GET", f"/walt-vpn/node/{mac12}/eeprom-digest",
                   source=node_ip(mac12)).body.decode()


# -- the gate's commands ---------------------------------------------------------------

def test_eeprom_digest_and_image_are_the_nodes_own(site: Site) -> None:
    for mac12 in (A, B):
        digest = _ssh(site.creds[mac12], "node", "eeprom-digest")
        assert digest.returncode == 0, digest.stderr
        assert digest.stdout.decode() == _expected_digest(site, mac12)
        image = _ssh(site.creds[mac12], "node", "eeprom-image")
        assert image.returncode == 0, image.stderr
        assert len(image.stdout) == 2 * 1024 * 1024
        assert hashlib.sha256(image.stdout).hexdigest() + "\n" == digest.stdout.decode()
    # The node cannot name another node: any argument makes it another command.
    other = _ssh(site.creds[A], "node", "eeprom-image", B)
    assert other.returncode == 1
    assert b"walt-vpn: command" in other.stderr and b"refused" in other.stderr
    assert other.stdout == b""


@pytest.mark.parametrize("command", [["id"], ["sh", "-c", "id"], ["eeprom-digest;id"],
                                     ["/usr/lib/openssh/sftp-server", "-d", "/"], ["scp", "-f", "/etc/passwd"]])
def test_other_commands_are_refused(site: Site, command: list[str]) -> None:
    result = _ssh(site.creds[A], "node", *command)
    if command[0].endswith("sftp-server"):  # that is the SFTP door: it speaks SFTP, nothing else
        assert result.returncode == 0 and result.stdout == b""
        return
    assert result.returncode == 1, result
    assert result.stdout == b""
    assert result.stderr.decode().startswith("walt-vpn: command ")


def test_no_shell_and_no_pty(site: Site) -> None:
    shell = _ssh(site.creds[A], "-T", "node", stdin=b"id\n")
    assert shell.returncode == 1
    assert b"walt-vpn: no shell here" in shell.stderr
    assert b"uid=" not in shell.stdout
    pty = _ssh(site.creds[A], "-tt", "node", "eeprom-digest")
    assert b"PTY allocation request failed" in pty.stderr


# -- forwarding -----------------------------------------------------------------------

def test_w_and_remote_forward_are_refused(site: Site) -> None:
    # -W (what -L and ProxyJump open: a direct-tcpip channel) to the admin API
    w = _ssh(site.creds[A], "-W", f"127.0.0.1:{site.admin_port}", "node")
    assert w.returncode == 255
    assert b"stdio forwarding failed" in w.stderr
    r = _ssh(site.creds[A], "-N", "-o", "ExitOnForwardFailure=yes",
             "-R", f"127.0.0.1:{free_port()}:127.0.0.1:{site.admin_port}", "node")
    assert r.returncode == 255
    assert b"remote port forwarding failed" in r.stderr


def _through_forward(config: Path, flag: str, spec: str, connect: object) -> bytes:
    """Start `ssh -N <flag> <spec>`, wait for its local listener, run `connect(port)`."""
    port = int(spec.split(":")[0])
    proc = subprocess.Popen(["ssh", "-F", str(config), "-N", flag, spec, "node"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc, "ssh")
        assert callable(connect)
        data: bytes = connect(port)
        return data
    finally:
        proc.kill()  # our own ssh client
        proc.wait(30)


def _http_get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /api/nodes HTTP/1.0\r\nHost: localhost\r\n\r\n")
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:  # ssh closes the refused channel's socket
            pass
        return b"".join(chunks)


def _socks_get(admin_port: int) -> object:
    def connect(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"\x05\x01\x00")
            if sock.recv(2) != b"\x05\x00":  # ssh's own SOCKS server answers this
                return b""
            sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                         + admin_port.to_bytes(2, "big"))
            try:
                reply = sock.recv(10)
            except ConnectionResetError:
                return b""
            if len(reply) < 2 or reply[1] != 0:
                return b""
            sock.sendall(b"GET /api/nodes HTTP/1.0\r\nHost: localhost\r\n\r\n")
            return sock.recv(65536)
    return connect


def test_local_and_dynamic_forward_carry_nothing(site: Site) -> None:
    local = _through_forward(site.creds[A], "-L", f"{free_port()}:127.0.0.1:{site.admin_port}",
                             _http_get)
    assert local == b""
    dynamic = _through_forward(site.creds[A], "-D", f"{free_port()}", _socks_get(site.admin_port))
    assert dynamic == b""
    assert site.sshd.log_text().count("refused local port forward") >= 2


# -- SFTP ------------------------------------------------------------------------------

def test_sftp_reads_own_root_only(site: Site) -> None:
    root_a, root_b = site.roots / A, site.roots / B
    out = site.tmp / "got"
    ok = _sftp(site.creds[A], f"get {root_a}/etc/hostname {out}", f"get {root_a}/big.bin {out}.big",
               f"get {root_a}/hostname-link {out}.link", f"get etc/hostname {out}.rel",
               f"ls {root_a}")
    assert ok.returncode == 0, ok.stderr
    assert out.read_text() == f"node-{A}\n" and Path(f"{out}.link").read_text() == f"node-{A}\n"
    assert Path(f"{out}.rel").read_text() == f"node-{A}\n"
    assert Path(f"{out}.big").read_bytes() == (root_a / "big.bin").read_bytes()
    refused = [
        f"get {root_a}/../{B}/secret {out}.x",   # ..
        f"get {root_b}/secret {out}.x",           # another node's root, absolute
        f"get ../{B}/secret {out}.x",             # relative
        f"get {root_a}/to-b {out}.x",             # symlink into B's root
        f"get {root_a}/passwd-abs {out}.x",       # symlink to /etc/passwd
        f"get /etc/passwd {out}.x",
        f"ls {root_b}",
        "ls /",
        f"put {out} {root_a}/new",                 # writes
        f"mkdir {root_a}/newdir",
        f"rm {root_a}/etc/hostname",
        f"rename {root_a}/etc/hostname {root_a}/etc/h2",
        f"chmod 777 {root_a}/etc/hostname",
        f"symlink /etc/passwd {root_a}/new-link",
    ]
    for command in refused:
        result = _sftp(site.creds[A], command)
        assert result.returncode != 0, (command, result.stdout)
        assert not Path(f"{out}.x").exists(), command
    assert sorted(p.name for p in root_a.iterdir()) == ["big.bin", "etc", "hostname-link",
                                                         "passwd-abs", "to-b"]
    assert (root_a / "etc" / "hostname").read_text() == f"node-{A}\n"
    # B reads its own secret; the SFTP log counts every request (SftpStats, bench/vpnboot.py).
    mine = _sftp(site.creds[B], f"get {root_b}/secret {out}.b")
    assert mine.returncode == 0, mine.stderr
    assert Path(f"{out}.b").read_text() == "B's secret\n"
    stats = parse_sftp_log(site.sshd.sftp_log.read_text())
    assert stats.requests["OPEN"] >= 5 and stats.requests["READ"] >= 3 * 1024 * 1024 // 262144
    assert stats.bytes_out > 3 * 1024 * 1024


def test_revoked_certificate_is_refused(site: Site) -> None:
    assert _ssh(site.creds[A], "node", "eeprom-digest").returncode == 0
    revoke = request(site.admin_port, "POST", f"/api/nodes/{A}/revoke", body=b"{}",
                     headers={"Content-Type": "application/json", "Host": "localhost"})
    assert revoke.status == 200, revoke.body
    refused = _ssh(site.creds[A], "node", "eeprom-digest")
    assert refused.returncode == 255
    assert b"Permission denied" in refused.stderr
    assert _ssh(site.creds[B], "node", "eeprom-digest").returncode == 0


# -- a separate entrypoint host relaying to the server's sshd -------------------------

def test_entrypoint_host_relays_only_to_the_server(site: Site) -> None:
    ca_pub = site.sshd.ca_public_key
    with TestSshd(site.tmp / "jump", ca_public_key=ca_pub,
                  forward_to=f"127.0.0.1:{site.sshd.port}") as jump:
        config = _node_config(site.tmp, site.sshd.port, A, site.port, jump=jump.port,
                              jump_known=jump.known_hosts_line("127.0.0.1"))
        via = _ssh(config, "node", "eeprom-digest")
        assert via.returncode == 0, via.stderr
        assert via.stdout.decode() == _expected_digest(site, A)
        shell = _ssh(config, "jump", "id")
        assert shell.returncode == 1 and b"only relays" in shell.stderr
        w = _ssh(config, "-W", f"127.0.0.1:{site.admin_port}", "jump")
        assert w.returncode == 255 and b"stdio forwarding failed" in w.stderr
        r = _ssh(config, "-N", "-o", "ExitOnForwardFailure=yes",
                 "-R", f"127.0.0.1:{free_port()}:127.0.0.1:{site.admin_port}", "jump")
        assert r.returncode == 255 and b"remote port forwarding failed" in r.stderr


# -- the gate on its own: identity comes only from sshd ---------------------------------

def _gate(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.gate", "--admin", "http://127.0.0.1:9",
                           "--root", str(tmp)], env={"PATH": os.environ["PATH"],
                           "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **env},
                          capture_output=True, text=True, timeout=60, check=False)


def test_gate_needs_the_exposed_certificate(tmp_path: Path, session_keys: Path) -> None:
    from fwbuild.keys import load_ssh_ca
    from fwbuild.virtual.vpnboot import issue_node_credentials

    no_auth = _gate(tmp_path, {"SSH_ORIGINAL_COMMAND": "eeprom-digest"})
    assert no_auth.returncode == 1 and "ExposeAuthInfo" in no_auth.stderr
    assert no_auth.stderr.count("\n") == 1 and "Traceback" not in no_auth.stderr

    def record(text: str) -> dict[str, str]:
        path = tmp_path / "auth"
        path.write_text(text)
        return {"SSH_USER_AUTH": str(path), "SSH_ORIGINAL_COMMAND": "eeprom-digest"}

    ca = load_ssh_ca(session_keys / "ssh-ca")
    cert = issue_node_credentials(ca, "vpn_dca63200000a", "").certificate.decode().split()
    wrong_id = issue_node_credentials(ca, "root", "").certificate.decode().split()
    plain = (session_keys / "ssh-ca.pub").read_text().split()
    cases = {
        "": "exactly one public-key",
        "password\n": "exactly one public-key",
        f"publickey {plain[0]} {plain[1]}\n": "not a plain key",
        f"publickey {cert[0]} AAAAgarbage\n": "unreadable key",
        f"publickey {wrong_id[0]} {wrong_id[1]}\n": "is not a node's",
        f"publickey {cert[0]} {cert[1]}\npublickey {cert[0]} {cert[1]}\n": "exactly one",
    }
    for text, message in cases.items():
        result = _gate(tmp_path, record(text))
        assert result.returncode == 1 and message in result.stderr, (text, result.stderr)
    # A good certificate, the server down: exit 2 (the node backs off and retries).
    down = _gate(tmp_path, record(f"publickey {cert[0]} {cert[1]}\n"))
    assert down.returncode == 2 and "unreachable" in down.stderr, down.stderr


# -- `fwbuild entrypoint ssh`: the same line, and an sshd drop-in sshd accepts -----------

def test_entrypoint_ssh_scripts(tmp_path: Path, session_keys: Path) -> None:
    import re

    from click.testing import CliRunner

    from fwbuild.cli import main
    from fwbuild.sshgate import gate_command, gate_line
    from tests.server_support import write_config

    config = write_config(tmp_path / "server.toml", artifacts=make_artifacts(tmp_path / "out", 4096),
                          state=tmp_path / "state", keys=copy_keys(session_keys, tmp_path / "keys"),
                          admin_port=8081)
    result = CliRunner().invoke(main, ["entrypoint", "ssh", "--config", str(config)])
    assert result.exit_code == 0, result.output
    script = result.output
    assert subprocess.run(["sh", "-n"], input=script, text=True, check=False).returncode == 0
    line = gate_line((tmp_path / "keys" / "ssh-ca.pub").read_text(), gate_command(
        sys.executable, "http://127.0.0.1:8081", "/var/lib/walt/nodes/{mac12}/fs",
        pythonpath=str(Path(__file__).resolve().parents[2])))
    assert line.strip() in script.splitlines()  # the very line TestSshd uses (fwbuild.sshgate)
    assert "restrict" not in line.split()[0]  # it would close the tunnel (OpenSSH >= 10.5)
    # The Match drop-in: sshd accepts it, and it applies to walt-vpn only.
    dropin = re.search(r"cat > \"\$conf.new\" <<'EOF'\n(.*?)\nEOF\n", script, re.DOTALL)
    assert dropin is not None
    (tmp_path / "dropin.conf").write_text(dropin.group(1).replace(
        str(tmp_path / "state" / "revoked_keys"), str(tmp_path / "revoked")) + "\n")
    (tmp_path / "revoked").write_text("")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "hk")],
                   check=True)
    (tmp_path / "sshd_config").write_text(
        f"Include {tmp_path / 'dropin.conf'}\nHostKey {tmp_path / 'hk'}\nX11Forwarding yes\n")

    def effective(user: str) -> str:
        return subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(tmp_path / "sshd_config"), "-C",
                               f"user={user},host=h,addr=127.0.0.1"], capture_output=True,
                              text=True, check=True).stdout

    gate = effective("walt-vpn")
    for setting in ("exposeauthinfo yes", "permittunnel ethernet", "allowtcpforwarding no",
                    "allowagentforwarding no", "x11forwarding no", "permittty no",
                    f"revokedkeys {tmp_path / 'revoked'}"):
        assert setting in gate.splitlines(), setting
    other = effective("alice")
    assert "exposeauthinfo no" in other.splitlines() and "x11forwarding yes" in other.splitlines()
    # --forwarding-host: the relaying host's line (also fwbuild.sshgate).
    relay = CliRunner().invoke(main, ["entrypoint", "ssh", "--forwarding-host", "--server-ssh",
                                      "walt-server:2222", "--config", str(config)])
    assert relay.exit_code == 0, relay.output
    assert 'restrict,port-forwarding,permitopen="walt-server:2222"' in relay.output
    refused = CliRunner().invoke(main, ["entrypoint", "ssh", "--server-ssh", "x:22",
                                        "--config", str(config)])
    assert refused.exit_code == 2 and "--forwarding-host" in refused.output
