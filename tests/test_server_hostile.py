"""Hostile requests: each gets the expected 4xx (never a 5xx, never a traceback) and the
database is unchanged afterwards."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from test_server_support import (  # noqa: F401 - fixtures
    INSIDE,
    OUTSIDE,
    db_snapshot,
    enroll,
    raw_request,
    running_fixture,
    server_env_fixture,
)

MAC12 = "dca632aabbcc"
REVOKED12 = "dca632000099"
UNKNOWN12 = "001122334455"


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode("latin-1")


def _post(path: str, body: bytes, ctype: str = "application/x-www-form-urlencoded",
          method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


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
    ("leading double slash", _get("//etc/passwd"), INSIDE, 404),
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
    ("huge request line", _get("/walt-vpn/" + "a" * 10000), INSIDE, 414),
    ("TLS hello on HTTP", bytes.fromhex("16030100a5010000a10303") + b"\r\n\r\n", INSIDE, 400),
    ("bad version", b"GET /walt-vpn/server HTTP/1.1x\r\n\r\n", INSIDE, 400),
    # Malformed MACs and keys.
    ("bad mac", _post(E, _enroll_body(mac="zz:zz:zz:zz:zz:zz")), INSIDE, 400),
    ("multicast mac", _post(E, _enroll_body(mac="01:00:5e:00:00:01")), INSIDE, 400),
    ("zero mac", _post(E, _enroll_body(mac="00:00:00:00:00:00")), INSIDE, 400),
    ("missing mac", _post(E, _enroll_body(**{"ssh-pubkey": "x"})), INSIDE, 400),
    ("garbage key", _post(E, _enroll_body(mac="dc:a6:32:00:00:10", **{"ssh-pubkey":
                                           "ssh-ed25519 AAAA!!notbase64"})), INSIDE, 400),
    ("certificate as key", _post(E, _enroll_body(mac="dc:a6:32:00:00:11",
                                                 **{"ssh-pubkey": CERT_LINE})), INSIDE, 400),
    ("weak RSA key", _post(E, _enroll_body(mac="dc:a6:32:00:00:12",
                                           **{"ssh-pubkey": _weak_rsa()})), INSIDE, 400),
    ("huge key", _post(E, _enroll_body(mac="dc:a6:32:00:00:13",
                                       **{"ssh-pubkey": "ssh-ed25519 " + "A" * 20000})),
     INSIDE, 400),
    ("unknown form field", _post(E, _enroll_body(mac="dc:a6:32:00:00:14", admin="1")),
     INSIDE, 400),
    ("non-utf8 form", _post(E, b"mac=\xff\xfe"), INSIDE, 400),
    ("xml body", _post(E, b"<mac/>", "text/xml"), INSIDE, 415),
    ("bad mac in path", _get("/walt-vpn/node/not-a-mac/boot.img"), INSIDE, 400),
    ("NUL mac in query", _get("/walt-vpn/node-conf/vpn-mac?mac=%00"), INSIDE, 400),
    ("repeated query", _get(f"/walt-vpn/node-conf/vpn-mac?mac={MAC12}&mac={UNKNOWN12}"),
     INSIDE, 400),
    ("missing query", _get("/walt-vpn/node-conf/vpn-mac"), INSIDE, 400),
    # Wrong methods.
    ("DELETE boot.img", f"DELETE {N}/boot.img HTTP/1.1\r\nHost: x\r\n\r\n".encode(), INSIDE, 405),
    ("PUT enroll", _post(E, _enroll_body(mac="dc:a6:32:00:00:20"), method="PUT"), INSIDE, 405),
    ("GET enroll", _get(E), INSIDE, 405),
    ("POST boot.img", _post(f"{N}/boot.img", b"x"), INSIDE, 405),
    ("TRACE", b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", INSIDE, 405),
    ("invented method", b"FROB /walt-vpn/server HTTP/1.1\r\nHost: x\r\n\r\n", INSIDE, 405),
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
    ("unknown pieeprom.bin", _get(f"/walt-vpn/node/{UNKNOWN12}/pieeprom.bin"), INSIDE, 404),
    ("unknown eeprom-digest", _get(f"/walt-vpn/node/{UNKNOWN12}/eeprom-digest"), INSIDE, 404),
    ("unknown vpn-mac", _get(f"/walt-vpn/node-conf/vpn-mac?mac={UNKNOWN12}"), INSIDE, 404),
    ("unknown node file", _get(f"{N}/config.txt"), INSIDE, 404),
    ("revoked boot.img", _get(f"/walt-vpn/node/{REVOKED12}/boot.img"), OUTSIDE, 403),
    ("revoked boot.sig", _get(f"/walt-vpn/node/{REVOKED12}/boot.sig"), INSIDE, 403),
    ("revoked eeprom-digest", _get(f"/walt-vpn/node/{REVOKED12}/eeprom-digest"), INSIDE, 403),
    ("revoked pieeprom.bin", _get(f"/walt-vpn/node/{REVOKED12}/pieeprom.bin"), INSIDE, 403),
    ("revoked creds", _get(f"/walt-vpn/node-conf/creds?mac={REVOKED12}"), INSIDE, 403),
    ("revoked re-enroll", _post(E, _enroll_body(mac=REVOKED12)), INSIDE, 403),
    # Through a reverse proxy sitting inside the subnet: the secret endpoints refuse.
    ("pieeprom.bin via proxy", _get(f"{N}/pieeprom.bin", "X-Forwarded-For: 203.0.113.9\r\n"), INSIDE, 403),
    ("creds via proxy", _get(f"/walt-vpn/node-conf/creds?mac={MAC12}", "Forwarded: for=203.0.113.9\r\n"),
     INSIDE, 403),
    ("enroll via proxy", _post(E, _enroll_body(mac="dca632000077"))[:-len("mac=dca632000077")].replace(
        b"\r\n\r\n", b"\r\nVia: 1.1 proxy\r\n\r\n") + b"mac=dca632000077", INSIDE, 403),
    # Non-ASCII digits: str.isdigit() says yes, int() says no.
    ("superscript length", _post(E, b"")[:-2].replace(b"Content-Length: 0", b"Content-Length: \xb2")
     + b"\r\n", INSIDE, 400),
]


@pytest.fixture
def populated(running: Any) -> Any:
    assert enroll(running.port, MAC12).status == 201
    assert enroll(running.port, REVOKED12).status == 201
    running.service.revoke(REVOKED12)
    return running


def test_hostile_requests(populated: Any, server_env: dict[str, Path],
                          caplog: pytest.LogCaptureFixture) -> None:
    assert len(CASES) >= 30
    database = server_env["state"] / "fwbuild-server.sqlite3"
    before = db_snapshot(database)
    revoked_before = (server_env["state"] / "revoked_keys").read_bytes()
    caplog.set_level(logging.INFO, logger="fwbuild.server")
    failures = []
    for name, data, source, expected in CASES:
        reply = raw_request(populated.port, data, source=source)
        if reply.status != expected:
            failures.append(f"{name}: got {reply.status}, expected {expected}: {reply.body[:200]!r}")
        assert b"Traceback" not in reply.body
    assert not failures, "\n".join(failures)
    assert db_snapshot(database) == before
    assert (server_env["state"] / "revoked_keys").read_bytes() == revoked_before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # One log line per response, none with a secret in it.
    lines = [r.getMessage() for r in caplog.records if r.name == "fwbuild.server.http"]
    assert len(lines) >= len(CASES)
    assert not any("PRIVATE KEY" in line or "WALT_VPN_CREDS" in line for line in lines)
    # The server still works afterwards.
    assert raw_request(populated.port, _get("/walt-vpn/server")).status == 200


def test_admin_refuses_non_loopback() -> None:
    from server.admin import _host_is_loopback
    from server.config import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.8.9.10")
    assert not is_loopback("192.0.2.1") and not is_loopback("::ffff:192.0.2.1")
    assert _host_is_loopback("localhost:8081") and _host_is_loopback("[::1]:8081")
    assert not _host_is_loopback("evil.example:8081")
