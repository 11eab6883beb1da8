"""WalT's anti-relay check-in (issue 12): `ssh walt-vpn@server check-in-walt-net` answers
`OK` only when the SSH client address is inside walt-net (the enrollment subnets), through
the real sshd and the SSH gate; the admin API answer it relies on."""

from __future__ import annotations

from typing import Any

import pytest
from server_support import (  # noqa: F401 - fixtures
    OUTSIDE,
    request,
    running_fixture,
    server_env_fixture,
)
from test_gate_sshd import A, Site, _ssh, pytestmark  # noqa: F401 - skip marks
from test_gate_sshd import site as site_fixture  # noqa: F401 - the `site` fixture


def test_check_in_from_walt_net_is_ok(site_fixture: Site) -> None:  # noqa: F811
    result = _ssh(site_fixture.creds[A], "node", "check-in-walt-net")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"OK\n"


def test_check_in_from_outside_walt_net_fails(site_fixture: Site) -> None:  # noqa: F811
    """The same certificate and host key, from an address off walt-net (a relay)."""
    result = _ssh(site_fixture.creds[A], "-b", OUTSIDE, "node", "check-in-walt-net")
    assert result.returncode == 1, result.stderr
    assert result.stdout == b"FAILED -- NOT in walt network\n"


@pytest.mark.parametrize(("ip", "inside"), [("127.1.0.10", True), (OUTSIDE, False),
                                            ("::ffff:127.0.0.1", True)])
def test_admin_walt_net_answer(running: Any, ip: str, inside: bool) -> None:
    reply = request(running.admin_port, "GET", f"/api/walt-net?ip={ip}")
    assert reply.status == 200 and reply.json()["inside"] is inside


def test_admin_walt_net_bad_address(running: Any) -> None:
    reply = request(running.admin_port, "GET", "/api/walt-net?ip=nope")
    assert reply.status == 400 and "not an IP address" in reply.json()["error"]
