"""WalT's VPN wire protocol, byte for byte (issue 12): every `node-conf/*` answer with and
without `?mac=`, WalT's enrollment (multipart `ssh-pubkey` only -> `OK\\n`), the per-ip
HTTP-boot paths, WalT's error keys. Reference: shared/spec/walt-vpn-reference.md,
"The wire protocol, exactly" (WalT's httpd.py / vpn.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from fwbuild.cli import main
from tests.server_support import (  # noqa: F401 - fixtures
    HOST_KEY_LINE,
    INSIDE,
    OUTSIDE,
    Reply,
    enroll,
    node_ip,
    request,
    running_fixture,
    server_env_fixture,
    sha256,
)

MAC = "dc:a6:32:aa:bb:cc"
MAC12 = "dca632aabbcc"
NODE = node_ip(MAC12)
NODE_DASH = NODE.replace(".", "-")
CONF = "/walt-vpn/node-conf/"
TEXT = "text/plain; charset=utf-8"
BOUNDARY = "WaltCurlBoundary0123"


def walt_keypair(directory: Path, kind: str = "ecdsa", bits: str = "384") -> str:
    """A key made on the node, as WalT's client does (`ssh-keygen -t ecdsa -b 384`)."""
    key = directory / f"id_walt_vpn_{kind}{bits}"
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)]
    if bits:
        args[4:4] = ["-b", bits]
    subprocess.run(args, check=True)
    return key.with_suffix(".pub").read_text()


def walt_enroll(port: int, pubkey: str | None, source: str = NODE,
                headers: dict[str, str] | None = None) -> Reply:
    """`curl -F "ssh-pubkey=@-" http://.../walt-vpn/enroll` (a file part, no `mac`)."""
    parts = ""
    if pubkey is not None:
        parts = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"ssh-pubkey\"; "
                 f"filename=\"-\"\r\nContent-Type: application/octet-stream\r\n\r\n{pubkey}\r\n")
    body = (parts + f"--{BOUNDARY}--\r\n").encode()
    return request(port, "POST", "/walt-vpn/enroll", body=body, source=source,
                   headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                            **(headers or {})})


def get(port: int, path: str, source: str = NODE, **kw: Any) -> Reply:
    return request(port, "GET", path, source=source, **kw)


def test_site_values_are_bare(running: Any) -> None:
    """Entrypoints and boot-mode: WalT's bare values, no trailing newline, text/plain."""
    port = running.port
    for path, body in (("ssh-entrypoint", b"vpn.example.org:2222"),
                       ("http-entrypoint", b"boot.example.org"),
                       ("boot-mode", b"enforced")):
        for source in (NODE, INSIDE, OUTSIDE):
            reply = get(port, CONF + path, source)
            assert (reply.status, reply.body, reply.headers["content-type"]) == (200, body, TEXT)
    assert get(port, "/walt-vpn/server").body == b"walt-server\n"


def test_not_enrolled_and_not_a_node(running: Any) -> None:
    """vpn-mac / ssh-pubkey-cert: empty 200 before enrollment; `Invalid request.` (400) from
    an address on walt-net bound to no node; 403 from outside; http-path any time."""
    port = running.port
    for path in ("vpn-mac", "ssh-pubkey-cert"):
        reply = get(port, CONF + path)
        assert (reply.status, reply.body) == (200, b""), path
        refused = get(port, CONF + path, INSIDE, headers={"Prefer": "errors=text-only"})
        assert (refused.status, refused.body) == (400, b"Invalid request.\n"), path
        assert get(port, CONF + path, OUTSIDE).status == 403
    assert get(port, CONF + "http-path").body == f"walt-vpn/per-ip/{NODE_DASH}".encode()
    assert get(port, CONF + "http-path", INSIDE).status == 400


def test_errors_json_carries_walts_keys(running: Any) -> None:
    reply = get(running.port, CONF + "vpn-mac", INSIDE, headers={"Prefer": "errors=json"})
    assert reply.status == 400 and reply.headers["content-type"] == "application/json"
    body = json.loads(reply.body)
    assert body["error"] == "Invalid request." and body["status_code"] == 400
    missing = walt_enroll(running.port, None, headers={"Prefer": "errors=json"})
    assert missing.status == 400
    assert json.loads(missing.body)["error"] == "Public key not provided."
    assert json.loads(missing.body)["status_code"] == 400


def test_walt_enrollment_and_every_property(running: Any, tmp_path: Path,
                                            server_env: dict[str, Path]) -> None:
    port = running.port
    pub = walt_keypair(tmp_path)
    reply = walt_enroll(port, pub)
    assert (reply.status, reply.body, reply.headers["content-type"]) == (200, b"OK\n", TEXT)
    node = running.service.node(MAC12)
    assert node.vpn_mac.startswith("52:54:00:")
    for query in ("", f"?mac={MAC12}", f"?mac={MAC}"):
        vpn = get(port, CONF + "vpn-mac" + query)
        assert (vpn.status, vpn.body, vpn.headers["content-type"]) == \
            (200, node.vpn_mac.encode(), TEXT)
        path = get(port, CONF + "http-path" + query)
        assert path.body == f"walt-vpn/per-ip/{NODE_DASH}".encode()
        assert get(port, CONF + "boot-mode" + query).body == b"enforced"
        cert = get(port, CONF + "ssh-pubkey-cert" + query)
        assert cert.status == 200 and cert.headers["cache-control"] == "no-store"
        line = cert.body.decode()
        assert line.endswith("\n") and line.count("\n") == 1
        assert line.startswith("ecdsa-sha2-nistp384-cert-v01@openssh.com ")
    # The certificate is OpenSSH's: ssh-keygen -L reads it, id and principal are WalT's.
    (tmp_path / "cert.pub").write_bytes(cert.body)
    listing = subprocess.run(["ssh-keygen", "-L", "-f", str(tmp_path / "cert.pub")],
                             capture_output=True, text=True, check=True).stdout
    assert f'Key ID: "vpn_{MAC12}"' in listing and "walt-vpn" in listing
    # ?mac= naming another node is refused, as before.
    assert get(port, CONF + "vpn-mac?mac=dca632123456").status == 403
    # Host keys: `ssh-keyscan -H` lines for the entrypoint ([host]:port as ssh hashes it).
    hosts = get(port, CONF + "ssh-entrypoint-host-keys")
    assert hosts.status == 200
    lines = hosts.body.decode().splitlines()
    assert len(lines) == 1
    hashed, key = lines[0].split(" ", 1)
    assert key == HOST_KEY_LINE
    _, magic, salt, digest = hashed.split("|")
    assert magic == "1"
    assert hmac.new(base64.b64decode(salt), b"[vpn.example.org]:2222",
                    hashlib.sha1).digest() == base64.b64decode(digest)
    (tmp_path / "known_hosts").write_bytes(hosts.body)
    found = subprocess.run(["ssh-keygen", "-F", "[vpn.example.org]:2222", "-f",
                            str(tmp_path / "known_hosts")], capture_output=True, text=True,
                           check=False)
    assert found.returncode == 0 and "ssh-ed25519" in found.stdout
    # The node keeps its own key: no server-rendered EEPROM image, 409 with a hint.
    for art in ("pieeprom.bin", "pieeprom.sig", "eeprom-digest"):
        refused = get(port, f"/walt-vpn/node/{MAC12}/{art}", headers={"Prefer": "errors=json"})
        assert refused.status == 409, art
        assert "own client" in json.loads(refused.body)["hint"]
    # Re-enrollment with a new key (the EEPROM was reset): a new certificate, same VPN MAC.
    again = walt_enroll(port, walt_keypair(tmp_path, "ed25519", ""))
    assert again.body == b"OK\n"
    assert get(port, CONF + "vpn-mac").body == node.vpn_mac.encode()
    assert get(port, CONF + "ssh-pubkey-cert").body.startswith(b"ssh-ed25519-cert-v01@openssh.com ")
    # `fwbuild nodes set-mode` changes this node's boot-mode answer (the site's stays).
    result = CliRunner().invoke(main, ["nodes", "set-mode", MAC, "permissive", "--config",
                                       str(server_env["config"])])
    assert result.exit_code == 0, result.output
    assert get(port, CONF + "boot-mode").body == b"permissive"
    assert get(port, CONF + "boot-mode", INSIDE).body == b"enforced"


def test_walt_enroll_asks_json_and_rsa(running: Any, tmp_path: Path) -> None:
    """A WalT-style body asking for JSON gets our JSON; RSA node keys are certified too."""
    reply = walt_enroll(running.port, walt_keypair(tmp_path, "rsa", "3072"),
                        headers={"Accept": "application/json"})
    assert reply.status == 201 and reply.json()["eeprom_digest"] is None
    assert reply.json()["certificate"].startswith("ssh-rsa-cert-v01@openssh.com ")
    unbound = walt_enroll(running.port, walt_keypair(tmp_path, "ecdsa", "521"), source=INSIDE)
    assert unbound.status == 403  # only a node's own address enrolls


def test_per_ip_boot_files(running: Any) -> None:
    """walt-vpn/per-ip/<a-b-c-d>/boot.img|boot.sig: the node/<mac12>/ files of the node
    bound to that address (same bytes, same access rules, events, 403 when revoked)."""
    port = running.port
    assert enroll(port, MAC).status == 201
    per_ip = f"/walt-vpn/per-ip/{NODE_DASH}/"
    by_mac = f"/walt-vpn/node/{MAC12}/"
    img = get(port, per_ip + "boot.img")
    assert img.status == 200 and img.headers["content-type"] == "application/octet-stream"
    assert img.body == get(port, by_mac + "boot.img", OUTSIDE).body
    sig = get(port, per_ip + "boot.sig")
    assert sig.status == 200 and sig.body == get(port, by_mac + "boot.sig").body
    assert sig.body.decode().splitlines()[0] == sha256(img.body)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the event is recorded after the body went out
        info = running.service.describe(running.service.node(MAC12), events=10)
        if any(e["artifact"] == "boot.img" and e["result"] == "200" for e in info["events"]):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no boot.img event for the per-ip fetch")
    assert running.service.node(MAC12).last_boot is not None
    for bad in ("10-0-0", "10-0-0-256", "a-b-c-d", "127-1-9-9"):  # last: bound to no node
        assert get(port, f"/walt-vpn/per-ip/{bad}/boot.img").status == 404, bad
    running.service.revoke(MAC12)
    for name in ("boot.img", "boot.sig"):
        assert get(port, per_ip + name).status == 403
