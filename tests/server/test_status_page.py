"""The status page, its JSON model, /api and /healthz over HTTP (the browser test is
test_status_browser.py): what they show, and what they refuse."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.server_support import (  # noqa: F401 - fixtures
    OUTSIDE,
    db_snapshot,
    enroll,
    node_ip,
    request,
    running_fixture,
    server_env_fixture,
)

MAC, MAC12 = "dc:a6:32:aa:bb:cc", "dca632aabbcc"
LOCAL = {"Host": "localhost"}


def _status(admin: int) -> Any:
    reply = request(admin, "GET", "/api/status", headers=LOCAL)
    assert reply.status == 200, reply.body
    return reply.json()


def _node(model: Any, mac12: str) -> Any:
    return next(n for n in model["nodes"] if n["id"] == mac12)


def _wait_fetched(admin: int, mac12: str) -> Any:
    deadline = time.monotonic() + 60  # the fetch is recorded after the response went out
    while time.monotonic() < deadline:
        node = _node(_status(admin), mac12)
        if node["fetched_eeprom"]:
            return node
        time.sleep(0.2)
    raise AssertionError("the pieeprom.bin fetch was never recorded")


def test_expected_vs_fetched_eeprom(running: Any) -> None:
    assert enroll(running.port, MAC).status == 201
    node = _node(_status(running.admin_port), MAC12)
    assert node["eeprom_text"] == "never fetched: will flash" and node["fetched_eeprom"] == ""
    image = request(running.port, "GET", f"/walt-vpn/node/{MAC12}/pieeprom.bin",
                    source=node_ip(MAC))
    assert image.status == 200
    node = _wait_fetched(running.admin_port, MAC12)
    assert node["fetched_eeprom"] == node["expected_eeprom"]
    assert node["eeprom_text"] == "up to date" and node["eeprom_css"] == "ok"
    running.service.set_mode(MAC, "permissive")
    node = _node(_status(running.admin_port), MAC12)
    assert node["expected_eeprom"] != node["fetched_eeprom"]
    assert node["eeprom_text"] == "differs: will re-flash"
    assert node["mode"] == "permissive" and node["mode_source"] == "override"
    page = request(running.admin_port, "GET", f"/nodes/{MAC12}", headers=LOCAL).text
    assert "differs: will re-flash" in page and node["fetched_eeprom"] in page
    assert "UTC" in node["cert_expiry_text"]


def test_boot_key_fingerprint_matches_keys_show(running: Any,
                                               server_env: dict[str, Path]) -> None:
    from fwbuild.keys import describe_keys

    keys = describe_keys(server_env["keys"])
    build = _status(running.admin_port)["artifacts"]["build"]
    assert build["boot_key_sha256"] == keys.boot_key_sha256
    assert build["pubkey_bin_sha256"] == keys.pubkey_bin_sha256
    page = request(running.admin_port, "GET", "/", headers=LOCAL).text
    assert f"sha256:{keys.boot_key_sha256}" in page


def test_page_escapes_manifest_text(running: Any, server_env: dict[str, Path]) -> None:
    manifest = server_env["artifacts"] / "manifest.json"
    data = json.loads(manifest.read_text())
    data["recipe"]["name"] = "<script>alert(1)</script>"
    data["fwbuild_version"] = "\"><img src=x onerror=alert(2)>"
    manifest.write_text(json.dumps(data))
    page = request(running.admin_port, "GET", "/", headers=LOCAL).text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page


def test_healthz_is_public_and_tells_no_secret(running: Any, server_env: dict[str, Path]) -> None:
    assert enroll(running.port, MAC).status == 201
    before = db_snapshot(server_env["state"] / "fwbuild-server.sqlite3")
    for source, headers in ((OUTSIDE, None), (OUTSIDE, {"X-Forwarded-For": "192.0.2.1"})):
        reply = request(running.port, "GET", "/healthz", source=source, headers=headers)
        assert reply.status == 200
        assert reply.json() == {"status": "ok", "artifact_problems": 0, "database": "ok",
                                "nodes": 1, "version": reply.json()["version"]}
        for secret in (MAC, MAC12, str(server_env["root"]), "vpn_"):
            assert secret not in reply.text
    assert request(running.port, "POST", "/healthz", body=b"{}", source=OUTSIDE).status == 405
    assert request(running.port, "GET", "/healthz/x", source=OUTSIDE).status == 404
    assert db_snapshot(server_env["state"] / "fwbuild-server.sqlite3") == before
    (server_env["artifacts"] / "bootimg" / "boot.img").unlink()
    down = request(running.port, "GET", "/healthz", source=OUTSIDE)
    assert down.status == 503 and down.json()["status"] == "degraded"
    assert down.json()["artifact_problems"] == 1 and "boot.img" not in down.text


def test_api_lists_the_route_table(running: Any) -> None:
    from server.identity import NodeBinder
    from server.routes import build_routes

    listed = request(running.admin_port, "GET", "/api", headers=LOCAL).json()
    table = build_routes(running.service, NodeBinder(running.service.config))
    assert [(e["path"], e["access"], e["listener"]) for e in listed] == \
        [(r.path, r.access, r.listener) for r in table]
    by_path = {e["path"]: e for e in listed}
    assert by_path["/healthz"]["access"] == "public"
    assert by_path["/api/status"]["access"] == "admin"
    assert by_path["/nodes/{mac}"]["summary"] == "HTML page of one node."
    assert request(running.port, "GET", "/api", source=OUTSIDE).status == 404


def test_admin_pages_refuse_hostile_requests(running: Any) -> None:
    assert enroll(running.port, MAC).status == 201
    for path in ("/api", "/api/status", f"/nodes/{MAC12}", "/"):
        for headers in ({"Host": "evil.example"}, {**LOCAL, "X-Forwarded-For": "127.0.0.1"},
                        {**LOCAL, "Forwarded": "for=192.0.2.1"}):
            reply = request(running.admin_port, "GET", path, headers=headers)
            assert reply.status == 403, (path, headers)
            assert MAC not in reply.text
        assert request(running.admin_port, "POST", path, body=b"{}",
                       headers={**LOCAL, "Content-Type": "application/json"}).status == 405
    bad = request(running.admin_port, "GET", "/nodes/%3Cscript%3E", headers=LOCAL)
    assert bad.status == 400 and "not a MAC address" in bad.text
    assert not bad.headers["content-type"].startswith("text/html")  # never rendered as HTML
    assert request(running.admin_port, "GET", "/nodes/dca632999999", headers=LOCAL).status == 404
    page = request(running.admin_port, "GET", "/", headers=LOCAL)
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
