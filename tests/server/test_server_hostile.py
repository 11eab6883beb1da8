"""Hostile requests: each gets the expected 4xx/5xx-free answer (never a traceback) and
the database (every row of every table) and the RevokedKeys file are unchanged after it.

One server (module scope) with three nodes: MAC12 (bound to node_ip(MAC12)), OTHER12
(another node, bound to its own address) and REVOKED12 (revoked). INSIDE is on the
enrollment subnet but bound to no node; OUTSIDE is off the subnets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.server_support import (
    INSIDE,
    OUTSIDE,
    copy_keys,
    db_snapshot,
    enroll,
    make_artifacts,
    node_ip,
    raw_request,
    write_config,
)

MAC12 = "dca632aabbcc"
OTHER12 = "dca632000077"
REVOKED12 = "dca632000099"
UNKNOWN12 = "001122334455"
NODE = node_ip(MAC12)
ADMIN = "admin"  # marker in the source column: send to the admin listener from 127.0.0.1


def _get(path: str, extra: str = "", host: str = "Host: x\r\n") -> bytes:
    return f"GET {path} HTTP/1.1\r\n{host}Connection: close\r\n{extra}\r\n".encode("latin-1")


def _post(path: str, body: bytes, ctype: str = "application/x-www-form-urlencoded",
          method: str = "POST", extra: str = "", host: str = "Host: x") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\n{host}\r\nConnection: close\r\nContent-Type: {ctype}"
            f"\r\n{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


def _enroll_body(**fields: str) -> bytes:
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in fields.items()).encode()


def _weak_rsa() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


CERT_LINE = ("ssh-ed25519-cert-v01@openssh.com AAAAIHNzaC1lZDI1NTE5LWNlcnQtdjAxQG9wZW5zc2guY29t"
             " fake")
E = "/walt-vpn/enroll"
N = f"/walt-vpn/node/{MAC12}"
O = f"/walt-vpn/node/{OTHER12}"
CREDS = "/walt-vpn/node-conf/creds"
LOCAL = "Host: localhost\r\n"
JSON = "application/json"

# (name, raw request bytes, source address, expected status)
CASES: list[tuple[str, bytes, str, int]] = [
    # Path traversal, in every segment and encoding.
    ("dotdot root", _get("/../etc/passwd"), INSIDE, 400),
    ("dotdot after prefix", _get("/walt-vpn/../../etc/passwd"), INSIDE, 400),
    ("dotdot in node segment", _get("/walt-vpn/node/../../../etc/passwd"), INSIDE, 400),
    ("dotdot in file segment", _get(f"{N}/../../../../etc/passwd"), INSIDE, 400),
    ("encoded dotdot mac", _get("/walt-vpn/node/%2e%2e/boot.img"), INSIDE, 400),
    ("encoded slashes file", _get(f"{N}/%2e%2e%2f%2e%2e%2fetc%2fpasswd"), INSIDE, 400),
    ("encoded dotdot prefix", _get("/walt-vpn/%2e%2e/%2e%2e/etc/passwd"), INSIDE, 400),
    ("encoded dotdot first", _get("/%2e%2e/walt-vpn/server"), INSIDE, 400),
    ("mixed encoding", _get(f"{N}/..%2fboot.img"), INSIDE, 400),
    ("encoded backslash", _get(f"{N}/..%5c..%5cboot.img"), INSIDE, 400),
    ("raw backslash", _get("/walt-vpn/node/..\\..\\boot.img"), INSIDE, 400),
    ("double encoding", _get("/walt-vpn/node/%252e%252e/boot.img"), INSIDE, 400),
    ("node-conf traversal", _get("/walt-vpn/node-conf/..%2f..%2fkeys%2fboot-signing.pem"),
     INSIDE, 400),
    ("NUL byte", _get(f"{N}/boot.img%00.txt"), INSIDE, 400),
    ("overlong utf-8 dot", _get("/walt-vpn/node/%c0%ae%c0%ae/boot.img"), INSIDE, 400),
    ("leading double slash", _get("//etc/passwd"), INSIDE, 400),
    ("empty segment", _get("/walt-vpn//server"), INSIDE, 400),
    ("dot segment", _get(f"{N}/./boot.img"), INSIDE, 400),
    ("absolute-form target", _get("http://evil.example/walt-vpn/server"), INSIDE, 400),
    ("state file by name", _get("/walt-vpn/fwbuild-server.sqlite3"), INSIDE, 404),
    # Huge or broken bodies and headers.
    ("huge body", (f"POST {E} HTTP/1.1\r\nHost: x\r\nContent-Type: application/"
                   "x-www-form-urlencoded\r\nContent-Length: 1000000000\r\n\r\n").encode(),
     INSIDE, 413),
    ("chunked body", (f"POST {E} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      "5\r\nmac=a\r\n0\r\n\r\n").encode(), INSIDE, 411),
    ("no content-length", f"POST {E} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
     INSIDE, 411),
    ("negative content-length", (f"POST {E} HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n"
                                 "\r\n").encode(), INSIDE, 400),
    ("huge header line", _get("/walt-vpn/server", "X-Big: " + "a" * 70000 + "\r\n"), INSIDE, 431),
    ("huge request line", _get("/walt-vpn/" + "a" * 100000), INSIDE, 431),
    ("TLS hello on HTTP", bytes.fromhex("16030100a5010000a10303") + b"\r\n\r\n", INSIDE, 400),
    ("bad version", b"GET /walt-vpn/server HTTP/1.1x\r\n\r\n", INSIDE, 400),
    # Malformed MACs and keys.
    ("bad mac", _post(E, _enroll_body(mac="zz:zz:zz:zz:zz:zz")), NODE, 400),
    ("multicast mac", _post(E, _enroll_body(mac="01:00:5e:00:00:01")), NODE, 400),
    ("zero mac", _post(E, _enroll_body(mac="00:00:00:00:00:00")), NODE, 400),
    ("garbage key, no mac", _post(E, _enroll_body(**{"ssh-pubkey": "x"})), NODE, 400),
    ("garbage key", _post(E, _enroll_body(mac=MAC12, **{"ssh-pubkey":
                                           "ssh-ed25519 AAAA!!notbase64"})), NODE, 400),
    ("certificate as key", _post(E, _enroll_body(mac=MAC12,
                                                 **{"ssh-pubkey": CERT_LINE})), NODE, 400),
    ("weak RSA key", _post(E, _enroll_body(mac=MAC12,
                                           **{"ssh-pubkey": _weak_rsa()})), NODE, 400),
    ("huge key", _post(E, _enroll_body(mac=MAC12,
                                       **{"ssh-pubkey": "ssh-ed25519 " + "A" * 20000})),
     NODE, 400),
    ("unknown form field", _post(E, _enroll_body(mac=MAC12, admin="1")),
     NODE, 400),
    ("non-utf8 form", _post(E, b"mac=\xff\xfe"), NODE, 400),
    ("xml body", _post(E, b"<mac/>", "text/xml"), NODE, 415),
    ("bad mac in path", _get("/walt-vpn/node/not-a-mac/boot.img"), INSIDE, 400),
    ("NUL mac in query", _get("/walt-vpn/node-conf/vpn-mac?mac=%00"), NODE, 400),
    ("repeated query", _get(f"/walt-vpn/node-conf/vpn-mac?mac={MAC12}&mac={UNKNOWN12}"),
     INSIDE, 400),
        # Wrong methods.
    ("DELETE boot.img", f"DELETE {N}/boot.img HTTP/1.1\r\nHost: x\r\n\r\n".encode(), INSIDE, 405),
    ("PUT enroll", _post(E, _enroll_body(mac="dc:a6:32:00:00:20"), method="PUT"), INSIDE, 405),
    ("GET enroll", _get(E), INSIDE, 405),
    ("POST boot.img", _post(f"{N}/boot.img", b"x"), INSIDE, 405),
    ("TRACE", b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", INSIDE, 405),
    ("invented method", b"FROB /walt-vpn/server HTTP/1.1\r\nHost: x\r\n\r\n", INSIDE, 400),
    # Enrollment and secrets from outside the enrollment subnets.
    ("enroll from outside", _post(E, _enroll_body(mac="dc:a6:32:00:00:30")), OUTSIDE, 403),
    ("re-key from outside", _post(E, _enroll_body(mac=MAC12)), OUTSIDE, 403),
    ("pieeprom.bin from outside", _get(f"{N}/pieeprom.bin"), OUTSIDE, 403),
    ("creds from outside", _get(f"/walt-vpn/node-conf/creds?mac={MAC12}"), OUTSIDE, 403),
    ("cert from outside", _get(f"/walt-vpn/node-conf/ssh-pubkey-cert?mac={MAC12}"), OUTSIDE, 403),
    ("unknown pieeprom from outside", _get(f"/walt-vpn/node/{UNKNOWN12}/pieeprom.bin"),
     OUTSIDE, 403),
    # Unknown and revoked nodes.
    ("unknown boot.img", _get(f"/walt-vpn/node/{UNKNOWN12}/boot.img"), INSIDE, 404),
    ("unknown boot.sig", _get(f"/walt-vpn/node/{UNKNOWN12}/boot.sig"), OUTSIDE, 404),
    ("unknown pieeprom.bin", _get(f"/walt-vpn/node/{UNKNOWN12}/pieeprom.bin"), NODE, 403),
    ("unknown eeprom-digest", _get(f"/walt-vpn/node/{UNKNOWN12}/eeprom-digest"), NODE, 403),
    ("unknown vpn-mac", _get(f"/walt-vpn/node-conf/vpn-mac?mac={UNKNOWN12}"), NODE, 403),
    ("unknown node file", _get(f"{N}/config.txt"), INSIDE, 404),
    ("revoked boot.img", _get(f"/walt-vpn/node/{REVOKED12}/boot.img"), OUTSIDE, 403),
    ("revoked boot.sig", _get(f"/walt-vpn/node/{REVOKED12}/boot.sig"), INSIDE, 403),
    ("revoked eeprom-digest", _get(f"/walt-vpn/node/{REVOKED12}/eeprom-digest"), node_ip(REVOKED12), 403),
    ("revoked pieeprom.bin", _get(f"/walt-vpn/node/{REVOKED12}/pieeprom.bin"), node_ip(REVOKED12), 403),
    ("revoked creds", _get(f"/walt-vpn/node-conf/creds?mac={REVOKED12}"), node_ip(REVOKED12), 403),
    ("revoked re-enroll", _post(E, _enroll_body(mac=REVOKED12)), node_ip(REVOKED12), 403),
    # Through a reverse proxy sitting inside the subnet: the secret endpoints refuse.
    ("pieeprom.bin via proxy", _get(f"{N}/pieeprom.bin", "X-Forwarded-For: 203.0.113.9\r\n"), NODE, 403),
    ("creds via proxy", _get(f"/walt-vpn/node-conf/creds?mac={MAC12}",
                             "Forwarded: for=203.0.113.9\r\n"), NODE, 403),
    ("enroll via proxy", _post(E, _enroll_body(mac="dca632000077"))[:-len("mac=dca632000077")].replace(
        b"\r\n\r\n", b"\r\nVia: 1.1 proxy\r\n\r\n") + b"mac=dca632000077", node_ip(OTHER12), 403),
    # Non-ASCII digits: str.isdigit() says yes, int() says no.
    ("superscript length", _post(E, b"")[:-2].replace(b"Content-Length: 0", b"Content-Length: \xb2")
     + b"\r\n", INSIDE, 400),

    # The parser cases: each refused before any routing.
    ("junk header line then X-Forwarded-For",
     _get(f"{CREDS}?mac={MAC12}", "X Junk: 1\r\nX-Forwarded-For: 203.0.113.9\r\n"), NODE, 400),
    ("X-Forwarded-For with space before colon",
     _get(f"{CREDS}?mac={MAC12}", "X-Forwarded-For : x\r\n"), NODE, 400),
    ("Transfer-Encoding gzip", _post(E, b"abc", extra="Transfer-Encoding: gzip\r\n"), NODE, 400),
    ("double Transfer-Encoding with Content-Length",
     (f"POST {E} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: "
      "chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n").encode(), NODE, 400),
    ("no Host on HTTP/1.1", _get(f"{CREDS}?mac={MAC12}", host=""), NODE, 400),
    ("duplicate Host on admin", _get("/api/nodes", host="Host: localhost\r\nHost: evil\r\n"),
     ADMIN, 400),
    ("HTTP/0.9", f"GET {CREDS}\r\n\r\n".encode(), NODE, 505),
    ("HTTP/2.0 request line", b"GET /walt-vpn/server HTTP/2.0\r\nHost: x\r\n\r\n", NODE, 505),
    ("ESC in method", b"G\x1bT /walt-vpn/server HTTP/1.1\r\nHost: x\r\n\r\n", NODE, 400),
    ("NUL in method", b"G\x00T /walt-vpn/server HTTP/1.1\r\nHost: x\r\n\r\n", NODE, 400),
    ("folded header", _get("/walt-vpn/server", "X-A: 1\r\n  X-Forwarded-For: 1\r\n"), NODE, 400),
    ("bare LF line ends", b"GET /walt-vpn/server HTTP/1.1\nHost: x\n\n", NODE, 400),
    ("two different Content-Lengths", (f"POST {E} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                                       "Content-Length: 2\r\n\r\nab").encode(), NODE, 400),
    ("60,000-deep JSON", _post(f"/api/nodes/{MAC12}/mode", b"[" * 60000, JSON,
                               host="Host: localhost"), ADMIN, 400),
    ("deep JSON, closed", _post(f"/api/nodes/{MAC12}/mode",
                                b"[" * 30000 + b"]" * 30000, JSON, host="Host: localhost"),
     ADMIN, 400),
    # Spoofing: a walt-net host asking for another node's secrets, or re-keying it.
    ("another node's creds", _get(f"{CREDS}?mac={OTHER12}"), NODE, 403),
    ("another node's certificate", _get(f"/walt-vpn/node-conf/ssh-pubkey-cert?mac={OTHER12}"),
     NODE, 403),
    ("another node's pieeprom.bin", _get(f"{O}/pieeprom.bin"), NODE, 403),
    ("another node's eeprom-digest", _get(f"{O}/eeprom-digest"), NODE, 403),
    ("another node's pieeprom.sig", _get(f"{O}/pieeprom.sig"), NODE, 403),
    ("another node's vpn-mac", _get(f"/walt-vpn/node-conf/vpn-mac?mac={OTHER12}"), NODE, 403),
    ("enroll another node", _post(E, _enroll_body(mac=OTHER12)), NODE, 403),
    ("enroll a new MAC from a bound address", _post(E, _enroll_body(mac="dc:a6:32:00:00:40")),
     NODE, 403),
    ("unbound address: creds", _get(CREDS), INSIDE, 403),
    ("unbound address: creds by mac", _get(f"{CREDS}?mac={MAC12}"), INSIDE, 403),
    ("unbound address: enroll", _post(E, _enroll_body(mac=MAC12)), INSIDE, 403),
    ("unbound address: pieeprom.bin", _get(f"{N}/pieeprom.bin"), INSIDE, 403),
    ("secret via a proxy header from the node", _get(f"{CREDS}", "Via: 1.1 proxy\r\n"), NODE, 403),
    ("pieeprom.bin with X-Real-IP", _get(f"{N}/pieeprom.bin", "X-Real-IP: 1.2.3.4\r\n"),
     NODE, 403),
    # The admin listener: loopback, a loopback Host, no forwarding header.
    ("admin with a foreign Host", _get("/api/nodes", host="Host: evil.example\r\n"), ADMIN, 403),
    ("admin with X-Forwarded-For", _get("/api/nodes", "X-Forwarded-For: 127.0.0.1\r\n", LOCAL),
     ADMIN, 403),
    ("admin with Forwarded", _get(f"/api/nodes/{MAC12}/pieeprom.bin", "Forwarded: for=x\r\n",
                                  LOCAL), ADMIN, 403),
    ("admin HTTP/1.0 without Host",
     f"GET /api/nodes/{MAC12}/eeprom-digest HTTP/1.0\r\n\r\n".encode(), ADMIN, 403),
    ("admin write without JSON type", _post(f"/api/nodes/{MAC12}/revoke", b"{}", "text/plain",
                                            host="Host: localhost"), ADMIN, 415),
    ("admin write as GET", _get(f"/api/nodes/{MAC12}/revoke", host=LOCAL), ADMIN, 405),
    ("admin unknown node image", _get(f"/api/nodes/{UNKNOWN12}/pieeprom.bin", host=LOCAL),
     ADMIN, 404),
    ("admin revoked node image", _get(f"/api/nodes/{REVOKED12}/pieeprom.bin", host=LOCAL),
     ADMIN, 403),
    ("admin bad mode", _post(f"/api/nodes/{MAC12}/mode", b'{"mode": "turbo"}', JSON,
                             host="Host: localhost"), ADMIN, 400),
    ("admin route on the node listener", _get("/api/nodes"), NODE, 404),
    # Artifacts by digest (public, immutable) and the entrypoint's authorization sub-request.
    ("by-digest not hex", _get(f"/walt-vpn/by-digest/{'g' * 64}/boot.img"), OUTSIDE, 404),
    ("by-digest short", _get("/walt-vpn/by-digest/abcd/boot.img"), OUTSIDE, 404),
    ("by-digest upper case", _get(f"/walt-vpn/by-digest/{'A' * 64}/boot.sig"), OUTSIDE, 404),
    ("by-digest unknown", _get(f"/walt-vpn/by-digest/{'0' * 64}/boot.img"), OUTSIDE, 404),
    ("by-digest dotdot", _get("/walt-vpn/by-digest/../boot.img"), OUTSIDE, 400),
    ("by-digest other file", _get(f"/walt-vpn/by-digest/{'0' * 64}/pieeprom.bin"), OUTSIDE, 404),
    ("by-digest as POST", _post(f"/walt-vpn/by-digest/{'0' * 64}/boot.img", b""), OUTSIDE, 405),
    ("auth without X-Original-URI", _get("/walt-vpn/entrypoint-auth"), OUTSIDE, 400),
    ("auth for a secret file", _get("/walt-vpn/entrypoint-auth",
                                    f"X-Original-URI: {N}/pieeprom.bin\r\n"), OUTSIDE, 404),
    ("auth for node-conf", _get("/walt-vpn/entrypoint-auth",
                                f"X-Original-URI: {CREDS}?mac={MAC12}\r\n"), OUTSIDE, 404),
    ("auth dotdot uri", _get("/walt-vpn/entrypoint-auth",
                             f"X-Original-URI: {N}/../{OTHER12}/boot.img\r\n"), OUTSIDE, 400),
    ("auth revoked node", _get("/walt-vpn/entrypoint-auth",
                               f"X-Original-URI: /walt-vpn/node/{REVOKED12}/boot.img\r\n"),
     OUTSIDE, 403),
    ("auth unknown node", _get("/walt-vpn/entrypoint-auth",
                               f"X-Original-URI: /walt-vpn/node/{UNKNOWN12}/boot.img\r\n"),
     OUTSIDE, 404),
    # An untrusted client's X-Real-IP is ignored: a 200 decision, and no boot event is written.
    ("auth X-Real-IP from untrusted", _get("/walt-vpn/entrypoint-auth",
                                           f"X-Original-URI: {N}/boot.img\r\nX-Real-IP: {NODE}\r\n"),
     INSIDE, 200),
]


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory, session_keys: Path) -> Iterator[Any]:
    from server.config import load_config
    from server.run import start_server

    root = tmp_path_factory.mktemp("hostile")
    config = write_config(root / "server.toml", artifacts=make_artifacts(root / "out", 65536),
                          state=root / "state", keys=copy_keys(session_keys, root / "keys"))
    srv = start_server(load_config(config))
    try:
        for mac in (MAC12, OTHER12, REVOKED12):
            assert enroll(srv.port, mac).status == 201
        srv.service.revoke(REVOKED12)
        srv.state = root / "state"
        yield srv
    finally:
        srv.stop()


def _send(srv: Any, data: bytes, source: str) -> Any:
    if source == ADMIN:
        return raw_request(srv.admin_port, data, source="127.0.0.1")
    return raw_request(srv.port, data, source=source)


def test_enough_cases() -> None:
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,data,source,expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_request(populated: Any, name: str, data: bytes, source: str, expected: int,
                         caplog: pytest.LogCaptureFixture) -> None:
    database = populated.state / "fwbuild-server.sqlite3"
    revoked = populated.state / "revoked_keys"
    before, revoked_before = db_snapshot(database), revoked.read_bytes()
    caplog.set_level(logging.INFO, logger="fwbuild.server")
    reply = _send(populated, data, source)
    assert reply.status == expected, reply.body[:300]
    assert b"Traceback" not in reply.body
    assert b"PRIVATE KEY" not in reply.body and b"WALT_VPN_CREDS" not in reply.body
    assert db_snapshot(database) == before
    assert revoked.read_bytes() == revoked_before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    lines = [r.getMessage() for r in caplog.records if r.name == "fwbuild.server.http"]
    assert not any("\x1b" in line or "\x00" in line for line in lines)  # escaped in the log
    # The server still answers afterwards.
    assert _send(populated, _get("/walt-vpn/server"), INSIDE).status == 200


def test_admin_refuses_non_loopback() -> None:
    from server.config import is_loopback
    from server.web import host_is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.8.9.10")
    assert not is_loopback("192.0.2.1") and not is_loopback("::ffff:192.0.2.1")
    assert host_is_loopback("localhost:8081") and host_is_loopback("[::1]:8081")
    assert not host_is_loopback("evil.example:8081")


# -- connections: trickling, idle floods, stopping (a real `fwbuild serve` process) ------------

class _Serve:
    """`fwbuild serve` in a subprocess, optionally under RLIMIT_NOFILE."""

    def __init__(self, root: Path, session_keys: Path, nofile: int | None = None,
                 size: int = 65536) -> None:
        import socket
        import subprocess
        import sys
        import time

        def free_port() -> int:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                return int(sock.getsockname()[1])

        self.port = free_port()
        self.state = root / "state"
        config = write_config(root / "server.toml", artifacts=make_artifacts(root / "out", size),
                              state=self.state, keys=copy_keys(session_keys, root / "keys"),
                              port=self.port, admin_port=free_port())

        limit = (f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, "
                 f"{nofile})); " if nofile is not None else "")
        self.log = root / "serve.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", limit + "from fwbuild.cli import main; main()", "serve",
                 "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if raw_request(self.port, _get("/walt-vpn/server"), timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "fwbuild serve did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _trickle(port: int, data: bytes, interval: float, source: str = INSIDE) -> tuple[int, bool]:
    """Send `data` a byte every `interval` s; (bytes sent, server closed the connection)."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port), source_address=(source, 0)) as sock:
        sock.settimeout(interval)
        for sent in range(len(data)):
            try:
                sock.sendall(data[sent:sent + 1])
                chunk = sock.recv(4096)  # waits `interval`
            except TimeoutError:
                continue
            except OSError:
                return sent, True
            if not chunk:
                return sent, True
            time.sleep(0)  # an answer arrived: the server did not wait for the rest
            return sent, True
        return len(data), False


def test_trickling_client_is_cut_off(populated: Any) -> None:
    """A client sending a byte every 2 s never completes a request: the server closes the
    connection (request deadline) long before the 60 s the request would take, and nothing
    is written."""
    database = populated.state / "fwbuild-server.sqlite3"
    before = db_snapshot(database)
    data = _get(f"{CREDS}?mac={MAC12}")[:30]
    sent, closed = _trickle(populated.port, data, 2.0, NODE)
    assert closed and sent < len(data)
    assert db_snapshot(database) == before


def test_idle_sockets_under_fd_limit(tmp_path: Path, session_keys: Path) -> None:
    """1000 idle sockets against a server limited to 1024 descriptors: a normal GET is still
    answered in < 1 s (the longest-idle connection is closed to make room) and the server
    never runs out of descriptors."""
    import os
    import resource
    import socket
    import time

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this test process may open only {hard} descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096) if hard ==
                                                resource.RLIM_INFINITY else min(hard, 4096),
                                                hard))
    server = _Serve(tmp_path, session_keys, nofile=1024)
    sockets: list[socket.socket] = []
    try:
        database = server.state / "fwbuild-server.sqlite3"
        before = db_snapshot(database)
        for _ in range(1000):
            sockets.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        t0 = time.monotonic()
        reply = raw_request(server.port, _get("/walt-vpn/server"), timeout=30)
        elapsed = time.monotonic() - t0
        assert reply.status == 200
        assert elapsed < 1.0, f"GET took {elapsed:.2f} s beside 1000 idle sockets"
        assert server.proc.poll() is None
        assert len(os.listdir(f"/proc/{server.proc.pid}/fd")) < 1024
        assert "out of system resource" not in server.log.read_text()
        assert db_snapshot(database) == before
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def test_sigterm_with_trickling_and_stalled_clients(tmp_path: Path, session_keys: Path) -> None:
    """SIGTERM while one client trickles its headers and another stalls mid-download of an
    8 MB boot.img: the server exits 0 in < 10 s."""
    import signal
    import socket
    import time

    server = _Serve(tmp_path, session_keys, size=8 << 20)
    database = server.state / "fwbuild-server.sqlite3"
    before = db_snapshot(database)
    try:
        trickler = socket.create_connection(("127.0.0.1", server.port))
        trickler.sendall(b"GET /walt-vpn/server HTTP/1.1\r\nHo")
        staller = socket.create_connection(("127.0.0.1", server.port))
        staller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        staller.sendall(_get("/walt-vpn/boot/boot.img"))
        assert staller.recv(16).startswith(b"HTTP/1.1 200")  # the download has started
        time.sleep(0.5)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(30)
        elapsed = time.monotonic() - t0
        assert code == 0, server.log.read_text()[-2000:]
        assert elapsed < 10, f"stopping took {elapsed:.1f} s"
        assert db_snapshot(database) == before
        trickler.close()
        staller.close()
    finally:
        server.stop()
