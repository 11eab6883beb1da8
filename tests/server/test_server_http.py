"""The server end to end in-process: enrollment, node-conf, HTTP boot files, EEPROM images,
conditional and range requests, admin API, status page, CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from fwbuild.cli import main
from fwbuild.eeprom.assemble import verify_eeprom
from fwbuild.eeprom.bootconf import parse_bootconf
from fwbuild.eeprom.image import parse_image
from fwbuild.keys import KeyPaths, load_boot_key
from fwbuild.sign import build_sig, parse_sig, verify_sig
from tests.server_support import (  # noqa: F401 - fixtures
    INSIDE,
    OUTSIDE,
    db_snapshot,
    enroll,
    file_mode,
    node_ip,
    request,
    running_fixture,
    server_env_fixture,
    sha256,
)

MAC = "dc:a6:32:aa:bb:cc"
MAC12 = "dca632aabbcc"
NODE = node_ip(MAC12)


def _bootconf(image: bytes) -> dict[str, str]:
    return parse_bootconf(parse_image(image).read_file("bootconf.txt").decode())


def test_enroll_then_fetch_everything(running: Any, server_env: dict[str, Path]) -> None:
    port = running.port
    reply = enroll(port, MAC)
    assert reply.status == 201, reply.body
    info = reply.json()
    assert info["mac"] == MAC
    assert info["vpn_mac"].startswith("52:54:00:")
    assert info["key_id"] == f"vpn_{MAC12}"
    assert info["http_path"] == f"walt-vpn/node/{MAC12}"
    assert reply.headers["cache-control"] == "no-store"

    assert request(port, "GET", "/walt-vpn/server").text == "walt-server\n"
    assert request(port, "GET", "/walt-vpn/node-conf/ssh-entrypoint").text == \
        "vpn.example.org:2222"
    assert request(port, "GET", "/walt-vpn/node-conf/http-entrypoint").text == "boot.example.org"
    assert request(port, "GET", "/walt-vpn/node-conf/boot-mode", source=NODE).text == "enforced"
    # Every accepted MAC spelling names the same node.
    for spelling in (MAC12, MAC.upper(), MAC.replace(":", "-")):
        assert request(port, "GET", f"/walt-vpn/node-conf/vpn-mac?mac={spelling}", source=NODE).text == \
            info["vpn_mac"]
    assert request(port, "GET", f"/walt-vpn/node-conf/http-path?mac={MAC12}", source=NODE).text == \
        "walt-vpn/per-ip/" + NODE.replace(".", "-")
    hostkeys = request(port, "GET", "/walt-vpn/node-conf/ssh-entrypoint-host-keys").text
    assert hostkeys.startswith("|1|") and " ssh-ed25519 AAAA" in hostkeys
    pem = request(port, "GET", "/walt-vpn/node-conf/public.pem").body
    boot_key = load_boot_key(KeyPaths(server_env["keys"]).boot_key)
    assert serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        boot_key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)

    # boot.img + boot.sig: the sig is made once (no boot.sig in the artifacts) and verifies.
    img = request(port, "GET", f"/walt-vpn/node/{MAC12}/boot.img", source=NODE)
    assert img.status == 200
    assert img.body == (server_env["artifacts"] / "bootimg/boot.img").read_bytes()
    assert img.headers["etag"] == f'"{sha256(img.body)}"'
    assert "last-modified" in img.headers and img.headers["accept-ranges"] == "bytes"
    sig = request(port, "GET", f"/walt-vpn/node/{MAC12}/boot.sig")
    verify_sig(img.body, parse_sig(sig.body), boot_key.public_key(), require_rsa=True)
    assert parse_sig(sig.body).ts == 1700000000  # the manifest's SOURCE_DATE_EPOCH
    assert list((server_env["state"] / "sigcache").glob("*.sig"))
    assert request(port, "GET", f"/walt-vpn/node/{MAC12}/boot.sig").body == sig.body

    # Events are recorded for the bound node only; the whole boot.img sets the last boot
    # (after the body went out: the client may be a moment ahead of the record).
    import time

    deadline = time.monotonic() + 30
    while (show := request(running.admin_port, "GET", f"/api/nodes/{MAC12}").json())[
            "last_boot"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert show["last_boot"] is not None
    artifacts = [e["artifact"] for e in show["events"]]
    assert artifacts.count("boot.img") == 1 and "enroll" in artifacts
    assert "boot.sig" not in artifacts  # public, not a boot
    # The site's boot image for the recovery EEPROM's first boot: same bytes, no MAC.
    site = request(port, "GET", "/walt-vpn/boot/boot.img", source=OUTSIDE)
    assert site.status == 200 and site.body == img.body
    assert request(port, "GET", "/walt-vpn/boot/boot.sig", source=OUTSIDE).body == sig.body
    # Another client (not the bound node) fetching the node's boot.img records nothing.
    before = db_snapshot(server_env["state"] / "fwbuild-server.sqlite3")
    assert request(port, "GET", f"/walt-vpn/node/{MAC12}/boot.img", source=INSIDE).status == 200
    assert db_snapshot(server_env["state"] / "fwbuild-server.sqlite3") == before


def test_node_eeprom_verifies_and_follows_mode(running: Any,
                                               server_env: dict[str, Path]) -> None:
    port = running.port
    assert enroll(port, MAC).status == 201
    boot_pub = load_boot_key(KeyPaths(server_env["keys"]).boot_key).public_key()
    image = request(port, "GET", f"/walt-vpn/node/{MAC12}/pieeprom.bin", source=NODE)
    assert image.status == 200 and len(image.body) == 2 * 1024 * 1024
    report = verify_eeprom(image.body, boot_pub)
    assert report.signed
    conf = _bootconf(image.body)
    assert conf["BOOT_ORDER"] == "0xf7" and conf["WALT_VPN_BOOT_MODE"] == "enforced"
    assert conf["HTTP_HOST"] == "boot.example.org"
    assert conf["HTTP_PATH"] == f"walt-vpn/node/{MAC12}"
    assert conf["WALT_VPN_ENTRYPOINT"] == "vpn.example.org:2222"
    assert conf["WALT_VPN_ROOT"] == f"/var/lib/walt/nodes/{MAC12}/fs"
    digest = request(port, "GET", f"/walt-vpn/node/{MAC12}/eeprom-digest", source=NODE).text.strip()
    assert digest == sha256(image.body)
    sig = parse_sig(request(port, "GET", f"/walt-vpn/node/{MAC12}/pieeprom.sig", source=NODE).body)
    assert sig.sha256 == digest and sig.target_soc == "2712"
    # Deterministic: the same request gives the same bytes (cache or not).
    assert request(port, "GET", f"/walt-vpn/node/{MAC12}/pieeprom.bin", source=NODE).body == image.body
    cached = list((server_env["state"] / "eeprom" / MAC12).glob("*.bin.gz"))
    assert len(cached) == 1 and file_mode(cached[0]) == 0o600

    saved = server_env["root"] / "node-pieeprom.bin"
    saved.write_bytes(image.body)
    verified = CliRunner().invoke(main, ["eeprom", "verify", "--key",
                                         str(KeyPaths(server_env["keys"]).boot_pub), str(saved)])
    assert verified.exit_code == 0, verified.output

    result = CliRunner().invoke(main, ["nodes", "set-mode", MAC, "permissive",
                                       "--config", str(server_env["config"])])
    assert result.exit_code == 0, result.output
    new_digest = request(port, "GET", f"/walt-vpn/node/{MAC12}/eeprom-digest", source=NODE).text.strip()
    assert new_digest != digest
    assert new_digest in result.output
    image2 = request(port, "GET", f"/walt-vpn/node/{MAC12}/pieeprom.bin", source=NODE).body
    assert sha256(image2) == new_digest
    verify_eeprom(image2, boot_pub)
    conf2 = _bootconf(image2)
    assert conf2["BOOT_ORDER"] == "0xf127" and conf2["WALT_VPN_BOOT_MODE"] == "permissive"
    assert conf2["ENABLE_SELF_UPDATE"] == "1"
    assert request(port, "GET", f"/walt-vpn/node-conf/boot-mode?mac={MAC12}", source=NODE).text == \
        "permissive"
    # Back to the site default (enforced): the digest changes again.
    assert CliRunner().invoke(main, ["nodes", "set-mode", MAC, "default", "--config",
                                     str(server_env["config"])]).exit_code == 0
    final = request(port, "GET", f"/walt-vpn/node/{MAC12}/eeprom-digest", source=NODE).text.strip()
    assert final not in (digest, new_digest)
    assert _bootconf(request(port, "GET",
                             f"/walt-vpn/node/{MAC12}/pieeprom.bin", source=NODE).body)["BOOT_ORDER"] == "0xf7"


def test_node_eeprom_uses_the_build_base_image(server_env: dict[str, Path]) -> None:
    from fwbuild.eeprom.synthetic import synthetic_image
    from server.config import load_config
    from server.run import start_server

    base = server_env["artifacts"] / "eeprom" / "enforced" / "pieeprom.bin"
    base.parent.mkdir(parents=True)
    base.write_bytes(synthetic_image("non-ab"))
    srv = start_server(load_config(server_env["config"]))
    try:
        enroll(srv.port, MAC)
        image = request(srv.port, "GET", f"/walt-vpn/node/{MAC12}/pieeprom.bin", source=NODE).body
    finally:
        srv.stop()
    assert parse_image(image).layout == "non-ab"  # the default synthetic base is "ab"
    assert _bootconf(image)["WALT_VPN_MAC"].startswith("52:54:00:")


def test_conditional_range_head(running: Any, server_env: dict[str, Path]) -> None:
    port = running.port
    enroll(port, MAC)
    path = f"/walt-vpn/node/{MAC12}/boot.img"
    data = (server_env["artifacts"] / "bootimg/boot.img").read_bytes()
    full = request(port, "GET", path)
    etag, modified = full.headers["etag"], full.headers["last-modified"]
    assert request(port, "GET", path, headers={"If-None-Match": etag}).status == 304
    assert request(port, "GET", path, headers={"If-None-Match": f'"x", W/{etag}'}).status == 304
    assert request(port, "GET", path, headers={"If-None-Match": '"other"'}).status == 200
    not_modified = request(port, "GET", path, headers={"If-Modified-Since": modified})
    assert not_modified.status == 304 and not_modified.body == b""
    part = request(port, "GET", path, headers={"Range": "bytes=100-1099"})
    assert part.status == 206 and part.body == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    assert request(port, "GET", path, headers={"Range": "bytes=-10"}).body == data[-10:]
    assert request(port, "GET", path, headers={"Range": f"bytes={len(data) - 5}-"}).body == \
        data[-5:]
    unsat = request(port, "GET", path, headers={"Range": f"bytes={len(data)}-"})
    assert unsat.status == 416 and unsat.headers["content-range"] == f"bytes */{len(data)}"
    # Multiple ranges and If-Range mismatches fall back to the whole file.
    assert request(port, "GET", path, headers={"Range": "bytes=0-1,5-9"}).status == 200
    assert request(port, "GET", path, headers={"Range": "bytes=0-1",
                                               "If-Range": '"stale"'}).status == 200
    assert request(port, "GET", path, headers={"Range": "bytes=0-1", "If-Range": etag}).status == 206
    head = request(port, "HEAD", path)
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == \
        str(len(data))
    # Replacing the artifact (a new build) changes the ETag at once.
    new = server_env["artifacts"] / "bootimg/boot.img.new"
    new.write_bytes(data[:1000] + b"changed")
    new.replace(server_env["artifacts"] / "bootimg/boot.img")
    changed = request(port, "GET", path, headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["etag"] != etag
    sig = parse_sig(request(port, "GET", f"/walt-vpn/node/{MAC12}/boot.sig").body)
    assert sig.sha256 == sha256(changed.body)


def test_reenroll_rotates_and_revokes(running: Any, server_env: dict[str, Path]) -> None:
    first = enroll(running.port, MAC).json()
    second = enroll(running.port, MAC)
    assert second.status == 200
    info = second.json()
    assert info["re_enrolled"] and info["vpn_mac"] == first["vpn_mac"]
    assert info["serial"] > first["serial"]
    assert info["certificate"].split()[1] != first["certificate"].split()[1]
    revoked = (server_env["state"] / "revoked_keys").read_text()
    first_key = request(running.port, "GET", "/walt-vpn/revoked-keys").text
    assert revoked == first_key
    assert f"vpn_{MAC12}-serial-{first['serial']}" in revoked
    assert f"-serial-{info['serial']}" not in revoked
    show = request(running.admin_port, "GET", f"/api/nodes/{MAC}").json()
    assert [c["revoked_at"] is not None for c in show["certificates"]] == [True, False]


def test_enroll_with_node_key_and_multipart(running: Any, tmp_path: Path) -> None:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)],
                   check=True)
    pub = key.with_suffix(".pub").read_text().strip()
    boundary = "fwbuildboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"mac\"\r\n\r\n{MAC}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"ssh-pubkey\"\r\n\r\n{pub}\r\n"
            f"--{boundary}--\r\n").encode()
    reply = request(running.port, "POST", "/walt-vpn/enroll", body=body, source=NODE,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert reply.status == 201, reply.body
    cert = reply.json()["certificate"]
    assert cert.startswith("ecdsa-sha2-nistp384-cert-v01@openssh.com ")
    creds = request(running.port, "GET", f"/walt-vpn/node-conf/creds?mac={MAC12}", source=NODE).text.strip()
    from server.certs import read_creds

    files = read_creds(creds)
    assert "id_ed25519" not in files  # the node keeps its own private key
    assert files["id_ed25519-cert.pub"].decode().strip() == cert
    # The same key cannot be certified twice.
    again = enroll(running.port, MAC, pub)
    assert again.status == 409


def test_admin_api_status_and_cli(running: Any, server_env: dict[str, Path]) -> None:
    enroll(running.port, MAC)
    enroll(running.port, "dc:a6:32:00:00:01")
    admin = running.admin_port
    nodes = request(admin, "GET", "/api/nodes").json()
    assert [n["mac"] for n in nodes] == ["dc:a6:32:00:00:01", MAC]
    page = request(admin, "GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script src" not in page.text.lower() and MAC in page.text  # inline script only
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "bootimg/boot.img" in page.text
    artifacts = request(admin, "GET", "/api/artifacts").json()
    assert "bootimg/boot.img" in artifacts
    # Writes need JSON (no form posts from web pages) and a loopback Host.
    form = request(admin, "POST", f"/api/nodes/{MAC12}/mode", body=b"mode=permissive",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 415
    rebinding = request(admin, "GET", "/api/nodes", headers={"Host": "evil.example"})
    assert rebinding.status == 403
    changed = request(admin, "POST", f"/api/nodes/{MAC12}/mode",
                      body=json.dumps({"mode": "permissive"}).encode(),
                      headers={"Content-Type": "application/json"})
    assert changed.status == 200 and changed.json()["boot_mode"] == "permissive"
    # The node-facing listener does not serve the admin API.
    assert request(running.port, "GET", "/api/nodes").status == 404

    config = str(server_env["config"])
    runner = CliRunner()
    listed = runner.invoke(main, ["nodes", "list", "--config", config])
    assert listed.exit_code == 0 and MAC in listed.output and "permissive" in listed.output
    as_json = json.loads(runner.invoke(main, ["nodes", "list", "--json", "--config",
                                              config]).output)
    assert len(as_json) == 2
    shown = runner.invoke(main, ["nodes", "show", MAC12, "--config", config])
    assert shown.exit_code == 0 and "vpn_dca632aabbcc" in shown.output
    revoked = runner.invoke(main, ["nodes", "revoke", MAC, "--yes", "--config", config])
    assert revoked.exit_code == 0, revoked.output
    assert request(running.port, "GET", f"/walt-vpn/node/{MAC12}/boot.img").status == 403
    assert enroll(running.port, MAC).status == 403  # revoked: must be forgotten first
    forgotten = runner.invoke(main, ["nodes", "forget", MAC, "--yes", "--config", config])
    assert forgotten.exit_code == 0
    assert request(running.port, "GET", f"/walt-vpn/node/{MAC12}/boot.img").status == 404
    assert enroll(running.port, MAC).status == 201
    unknown = runner.invoke(main, ["nodes", "show", "00:11:22:33:44:55", "--config", config])
    assert unknown.exit_code == 1 and "unknown node" in unknown.output
    bad = runner.invoke(main, ["nodes", "show", "not a node!", "--config", config])
    assert bad.exit_code == 2 and "not a MAC address or node label" in bad.output
    unlabelled = runner.invoke(main, ["nodes", "show", "nonsense", "--config", config])
    assert unlabelled.exit_code == 1 and "no node is labelled 'nonsense'" in unlabelled.output


def test_secrets_and_files_modes(running: Any, server_env: dict[str, Path]) -> None:
    enroll(running.port, MAC)
    state = server_env["state"]
    assert file_mode(state / "fwbuild-server.sqlite3") == 0o600
    assert file_mode(state) == 0o700
    snapshot = db_snapshot(state / "fwbuild-server.sqlite3")
    for path in (f"/walt-vpn/node/{MAC12}/pieeprom.bin", f"/walt-vpn/node-conf/creds?mac={MAC12}",
                 f"/walt-vpn/node-conf/ssh-pubkey-cert?mac={MAC12}",
                 f"/walt-vpn/node/{MAC12}/eeprom-digest", f"/walt-vpn/node/{MAC12}/pieeprom.sig"):
        for source in (OUTSIDE, INSIDE):  # off the subnets; on them but not this node
            assert request(running.port, "GET", path, source=source).status == 403
    assert db_snapshot(state / "fwbuild-server.sqlite3") == snapshot
    # Public values are served to anyone.
    for path in (f"/walt-vpn/node/{MAC12}/boot.sig", "/walt-vpn/boot/boot.sig",
                 "/walt-vpn/node-conf/public.pem"):
        assert request(running.port, "GET", path, source=OUTSIDE).status == 200, path


def test_error_formats(running: Any) -> None:
    as_json = request(running.port, "GET", "/walt-vpn/node/001122334455/boot.img")
    assert as_json.status == 404 and as_json.json()["error"].startswith("unknown node")
    text = request(running.port, "GET", "/walt-vpn/node/001122334455/boot.img",
                   headers={"Prefer": "errors=text-only"})
    assert text.status == 404 and text.text.startswith("unknown node")
    assert text.headers["content-type"].startswith("text/plain")


def test_entrypoint_commands(server_env: dict[str, Path]) -> None:
    runner = CliRunner()
    config = str(server_env["config"])
    for kind, needle in (("nginx", "location ^~ /walt-vpn/"), ("haproxy", "backend fwbuild_server"),
                         ("apache", 'ProxyPass "http://walt-server:8080/walt-vpn/"')):
        result = runner.invoke(main, ["entrypoint", "http", f"--{kind}", "--server",
                                      "walt-server:8080", "--config", config])
        assert result.exit_code == 0 and needle in result.output, result.output
    assert runner.invoke(main, ["entrypoint", "http", "--config", config]).exit_code == 2
    script = runner.invoke(main, ["entrypoint", "ssh", "--forwarding-host",
                                  "--server-ssh", "walt-server:22", "--config", config])
    assert script.exit_code == 0
    ca = (server_env["keys"] / "ssh-ca.pub").read_text().split()[1]
    assert ca in script.output and 'principals="walt-vpn"' in script.output
    assert "sshd_config" not in script.output.replace("No global sshd change", "")
    syntax = subprocess.run(["sh", "-n"], input=script.output, text=True, capture_output=True,
                            check=False)
    assert syntax.returncode == 0, syntax.stderr


def test_graceful_stop_finishes_inflight(server_env: dict[str, Path]) -> None:
    import http.client

    from server.config import load_config
    from server.run import start_server

    srv = start_server(load_config(server_env["config"]))
    enroll(srv.port, MAC)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("GET", f"/walt-vpn/node/{MAC12}/boot.img")
    resp = conn.getresponse()
    head = resp.read(1024)
    import threading

    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    rest = resp.read()
    stopper.join(30)
    assert not stopper.is_alive()
    expected = (server_env["artifacts"] / "bootimg/boot.img").read_bytes()
    assert head + rest == expected
    conn.close()


@pytest.mark.parametrize("prefer,kind", [("errors=json", "application/json"),
                                         ("errors=text-only", "text/plain")])
def test_prefer_on_parser_errors(running: Any, prefer: str, kind: str) -> None:
    reply = request(running.port, "DELETE", "/walt-vpn/server", headers={"Prefer": prefer})
    assert reply.status == 405 and reply.headers["content-type"].startswith(kind)
    assert reply.headers["allow"] == "GET, HEAD"
    assert INSIDE  # loopback only


def test_altered_artifact_set_is_never_signed(running: Any, server_env: dict[str, Path]) -> None:
    """A build's boot.sig that no longer matches boot.img: refuse (503), never re-sign."""
    port = running.port
    assert enroll(port, MAC).status == 201
    boot = server_env["artifacts"] / "bootimg" / "boot.img"
    (boot.parent / "boot.sig").write_bytes(build_sig(b"the image that was built", 1700000000,
                                                     key=load_boot_key(KeyPaths(server_env["keys"]).boot_key)))
    reply = request(port, "GET", f"/walt-vpn/node/{MAC12}/boot.sig", headers={"Prefer": "errors=text-only"})
    assert reply.status == 503
    assert b"artifact set was altered" in reply.body


def test_non_ascii_digits_in_range_are_ignored(running: Any) -> None:
    """'²'.isdigit() is True but int('²') fails: the Range is ignored, the file served whole."""
    port = running.port
    assert enroll(port, MAC).status == 201
    reply = request(port, "GET", f"/walt-vpn/node/{MAC12}/boot.img", headers={"Range": "bytes=\xb2-"})
    assert reply.status == 200


def test_pipelined_requests_all_answered(running: Any) -> None:
    import socket

    one = b"GET /walt-vpn/server HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /walt-vpn/server HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", running.port), timeout=30) as sock:
        sock.sendall(one * 3 + last)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 4 and data.count(b"walt-server\n") == 4
