"""The route table: every route has an access class, and each class's rule holds on every
route of the running server (public: no secret, no state write; node: the bound node only;
admin: loopback Host, no forwarding header)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.server_support import (  # noqa: F401 - fixtures
    INSIDE,
    OUTSIDE,
    db_snapshot,
    enroll,
    node_ip,
    request,
    running_fixture,
    server_env_fixture,
)

MAC12 = "dca632aabbcc"
OTHER12 = "dca632000077"
SECRETS = (b"PRIVATE KEY", b"WALT_VPN_CREDS", b"-cert-v01@openssh.com")


def _settled(database: Path) -> dict[str, Any]:
    """The database once no write is pending: a node fetch records its event after the
    response went out, so the client can be ahead of the server's `after` step."""
    import time

    previous = db_snapshot(database)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.3)
        current = db_snapshot(database)
        if current == previous:
            return current
        previous = current
    return previous


def _concrete(route: Any, digest: str = "") -> str:
    ip = node_ip(MAC12).replace(".", "-")
    values = {"{mac}": MAC12, "{ip}": ip, "{digest}": digest}
    return "/" + "/".join(values.get(p, p) for p in route.pattern)


def _call(port: int, route: Any, path: str, source: str,
          headers: dict[str, str] | None = None) -> Any:
    method = route.methods[0]
    if route.path == "/walt-vpn/entrypoint-auth":  # nginx's sub-request names the path
        headers = {"X-Original-URI": f"/walt-vpn/node/{MAC12}/boot.img", **(headers or {})}
    if method == "POST":
        body, ctype = ((f"mac={MAC12}".encode(), "application/x-www-form-urlencoded")
                       if route.access == "node" else (b"{}", "application/json"))
        return request(port, "POST", path, body=body, source=source,
                       headers={"Content-Type": ctype, **(headers or {})})
    return request(port, method, path, source=source, headers=headers)


@pytest.fixture
def table(running: Any) -> Any:
    from server.identity import NodeBinder
    from server.routes import build_routes

    for mac in (MAC12, OTHER12):
        assert enroll(running.port, mac).status == 201
    return build_routes(running.service, NodeBinder(running.service.config))


def test_every_route_has_a_class() -> None:
    from server.web import ACCESS_CLASSES, Route

    assert ACCESS_CLASSES == ("public", "node", "admin")
    for bad in ("", "private", None):
        with pytest.raises(ValueError):
            Route(("GET",), ("x",), bad, lambda r: None)  # type: ignore[arg-type, return-value]
    with pytest.raises(ValueError):  # a public route never writes: GET/HEAD only
        Route(("POST",), ("x",), "public", lambda r: None)  # type: ignore[arg-type, return-value]
    with pytest.raises(ValueError):  # admin routes only on the admin listener
        Route(("GET",), ("x",), "admin", lambda r: None)  # type: ignore[arg-type, return-value]


def test_each_class_rule_on_every_route(running: Any, table: Any,
                                        server_env: dict[str, Path]) -> None:
    from server.artifacts import BOOT_IMG
    from server.web import ACCESS_CLASSES

    database = server_env["state"] / "fwbuild-server.sqlite3"
    seen = {cls: 0 for cls in ACCESS_CLASSES}
    paths = {(r.listener, r.path) for r in table}
    for expected in ("/walt-vpn/boot/boot.img", "/walt-vpn/boot/boot.sig",
                     "/api/nodes/{mac}/pieeprom.bin", "/api/nodes/{mac}/eeprom-digest",
                     "/walt-vpn/node/{mac}/eeprom-digest", "/walt-vpn/enroll"):
        assert any(p == expected for _, p in paths), expected
    for route in table:
        assert route.access in ACCESS_CLASSES, route.path
        seen[route.access] += 1
        path = _concrete(route, running.service.artifacts.info(BOOT_IMG).sha256)
        before = _settled(database)
        if route.access == "public":
            for source, headers in ((OUTSIDE, None), (INSIDE, {"X-Forwarded-For": "192.0.2.7"})):
                reply = _call(running.port, route, path, source, headers)
                assert reply.status == 200, (path, reply.status, reply.body[:200])
                assert not any(s in reply.body for s in SECRETS), path
                assert reply.headers.get("cache-control") != "no-store", path
            assert db_snapshot(database) == before, f"public {path} wrote the database"
        elif route.access == "node":
            refusals = [
                (OUTSIDE, None, path),  # off the enrollment subnets
                (INSIDE, None, path),  # on them, bound to no node
                (node_ip(MAC12), {"Via": "1.1 proxy"}, path),  # the node, through a proxy
                (node_ip(OTHER12), None,  # another node naming MAC12
                 path if "{mac}" in route.pattern else path + f"?mac={MAC12}"),
            ]
            for source, headers, target in refusals:
                reply = _call(running.port, route, target, source, headers)
                # WalT's per-node properties: an address bound to no node is WalT's 400
                want = 400 if route.walt_unbound and source == INSIDE else 403
                assert reply.status == want, (route.path, source, reply.status, reply.body[:200])
                assert not any(s in reply.body for s in SECRETS)
            assert db_snapshot(database) == before, f"refused node {path} wrote the database"
            reply = _call(running.port, route, path, node_ip(MAC12))
            assert reply.status in (200, 201), (path, reply.status, reply.body[:200])
        else:
            for headers in ({"Host": "evil.example"}, {"Host": "localhost", "Forwarded": "for=x"},
                            {"Host": "localhost", "X-Forwarded-For": "127.0.0.1"}):
                reply = _call(running.admin_port, route, path, "127.0.0.1", headers)
                assert reply.status == 403, (path, headers, reply.status)
            assert db_snapshot(database) == before, f"refused admin {path} wrote the database"
            if route.methods[0] != "POST":
                reply = _call(running.admin_port, route, path, "127.0.0.1", {"Host": "localhost"})
                assert reply.status == 200, (path, reply.status, reply.body[:200])
        # Routes live on their own listener only.
        other = running.admin_port if route.listener == "node" else running.port
        assert _call(other, route, path, "127.0.0.1", {"Host": "localhost"}).status in (403, 404)
    assert all(seen.values()), seen


def test_admin_eeprom_routes_match_the_node_image(running: Any) -> None:
    import hashlib

    assert enroll(running.port, MAC12).status == 201
    image = request(running.admin_port, "GET", f"/api/nodes/{MAC12}/pieeprom.bin")
    assert image.status == 200 and len(image.body) == 2 * 1024 * 1024
    assert image.headers["content-type"] == "application/octet-stream"
    assert image.headers["cache-control"] == "no-store"
    digest = request(running.admin_port, "GET", f"/api/nodes/{MAC12}/eeprom-digest")
    assert digest.text == hashlib.sha256(image.body).hexdigest() + "\n"
    own = request(running.port, "GET", f"/walt-vpn/node/{MAC12}/pieeprom.bin",
                  source=node_ip(MAC12))
    assert own.body == image.body
    assert request(running.port, "GET", f"/walt-vpn/node/{MAC12}/eeprom-digest",
                   source=node_ip(MAC12)).text == digest.text


def test_enroll_binds_the_mac_of_the_address(running: Any) -> None:
    """The form may omit `mac`: the bound node enrolls; naming it explicitly works too."""
    reply = request(running.port, "POST", "/walt-vpn/enroll", body=b"",
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                    source=node_ip(MAC12))
    assert reply.status == 201, reply.body
    assert reply.json()["mac"] == "dc:a6:32:aa:bb:cc"
    again = enroll(running.port, "DC-A6-32-AA-BB-CC")  # same node, another spelling: re-key
    assert again.status == 200
    creds = request(running.port, "GET", "/walt-vpn/node-conf/creds", source=node_ip(MAC12))
    assert creds.status == 200 and creds.headers["cache-control"] == "no-store"
    assert request(running.port, "GET", f"/walt-vpn/node-conf/creds?mac={MAC12}",
                   source=node_ip(MAC12)).body == creds.body
