"""Pure parts of the server: configuration, MACs, paths, ranges, schema migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwbuild.errors import RecipeError, UsageError
from server.config import Endpoint, HostKey, load_config, parse_config, parse_host_keys
from server.db import SCHEMA_VERSION, Database, StateError
from server.errors import HttpError
from server.macs import normalise_mac, vpn_mac
from server.web import parse_range, split_path
from tests.server_support import HOST_KEY_LINE


def _base() -> dict[str, Any]:
    return {
        "server": {"artifacts": "out", "state_dir": "state", "keys_dir": "keys",
                   "enrollment_subnets": ["192.168.152.0/22"],
                   "node_root": "/var/lib/walt/nodes/{mac12}/fs", "hostname": "srv"},
        "entrypoints": {"http": "boot.example.org", "ssh": "vpn.example.org:2222",
                        "ssh_host_keys": [HOST_KEY_LINE]},
    }


def _with(section: str, key: str, value: Any) -> dict[str, Any]:
    data = _base()
    data.setdefault(section, {})[key] = value
    return data


def test_valid_config_defaults(tmp_path: Path) -> None:
    config = parse_config(_base(), tmp_path)
    assert config.port == 8080 and config.listen == "0.0.0.0"
    assert config.artifacts == tmp_path / "out"
    assert config.default_boot_mode == "enforced"
    assert config.revoked_keys_file == tmp_path / "state" / "revoked_keys"
    assert config.ssh_entrypoint == Endpoint("vpn.example.org", 2222)
    assert config.http_entrypoint.render(80) == "boot.example.org"
    assert config.admin.listen == "127.0.0.1"
    assert config.in_enrollment_subnets("192.168.153.7")
    assert not config.in_enrollment_subnets("192.168.156.1")
    assert config.in_enrollment_subnets("::ffff:192.168.152.1")
    assert not config.in_enrollment_subnets("not-an-ip")


@pytest.mark.parametrize("data,where,hint", [
    (_with("server", "http_hots", "x"), "server.http_hots", None),
    (_with("server", "enrolment_subnets", []), "server.enrolment_subnets",
     "did you mean `enrollment_subnets`?"),
    (_with("entrypoints", "ssh_host_key", []), "entrypoints.ssh_host_key",
     "did you mean `ssh_host_keys`?"),
    ({**_base(), "sever": {}}, "sever", "did you mean `server`?"),
    (_with("server", "default_boot_mode", "enforce"), "server.default_boot_mode",
     "did you mean `enforced`?"),
    (_with("server", "enrollment_subnets", ["10.0.0.1/8"]), "server.enrollment_subnets[0]", None),
    (_with("server", "enrollment_subnets", "10.0.0.0/8"), "server.enrollment_subnets", None),
    (_with("server", "port", 70000), "server.port", None),
    (_with("server", "port", True), "server.port", None),
    (_with("server", "node_root", "relative/{mac12}"), "server.node_root", None),
    (_with("server", "node_root", "/nodes/{mac}"), "server.node_root", "did you mean `mac12`?"),
    (_with("server", "node_root", "/nodes/../{mac12}"), "server.node_root", None),
    (_with("admin", "listen", "0.0.0.0"), "admin.listen", None),
    (_with("entrypoints", "http", "Boot.Example.org"), "entrypoints.http", None),
    (_with("entrypoints", "http", "[::1]:80"), "entrypoints.http", None),
    (_with("entrypoints", "ssh", "host:0"), "entrypoints.ssh", None),
    (_with("entrypoints", "ssh_host_keys", []), "entrypoints.ssh_host_keys", None),
    (_with("entrypoints", "ssh_host_keys", ["ssh-ed25519 AAAAC3NzaC1"]),
     "entrypoints.ssh_host_keys:1", None),
    (_with("entrypoints", "proxy_jump", "a b"), "entrypoints.proxy_jump", None),
])
def test_bad_config(tmp_path: Path, data: dict[str, Any], where: str, hint: str | None) -> None:
    with pytest.raises(RecipeError) as info:
        parse_config(data, tmp_path)
    assert info.value.where == where
    if hint:
        assert info.value.hint == hint


def test_missing_required_key(tmp_path: Path) -> None:
    data = _base()
    del data["server"]["state_dir"]
    with pytest.raises(RecipeError, match="missing required key `state_dir`"):
        parse_config(data, tmp_path)


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="server config not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_config(bad)


def test_host_keys_from_keyscan_output() -> None:
    text = (f"# 127.0.0.1:22 SSH-2.0-OpenSSH_9.2\n[127.0.0.1]:2222 {HOST_KEY_LINE}\n"
            f"{HOST_KEY_LINE} comment\n")
    assert parse_host_keys(text, "f") == [HostKey(*HOST_KEY_LINE.split())]


def test_known_hosts_form() -> None:
    from server.certs import known_hosts

    key = HostKey(*HOST_KEY_LINE.split())
    assert known_hosts(Endpoint("h.example", 22), [key]) == f"h.example {HOST_KEY_LINE}\n"
    assert known_hosts(Endpoint("h.example", 2222), [key]) == f"[h.example]:2222 {HOST_KEY_LINE}\n"


def test_macs() -> None:
    for text in ("DC:A6:32:AA:BB:CC", "dc-a6-32-aa-bb-cc", "dca632aabbcc", " dca632aabbcc "):
        assert normalise_mac(text) == "dca632aabbcc"
    for bad in ("dca632aabbc", "dc:a6:32:aa:bb:cc:dd", "gga632aabbcc", "01005e000001",
                "000000000000", "dc:a6-32:aa:bb:cc", "x" * 100):
        with pytest.raises(UsageError):
            normalise_mac(bad)
    assert vpn_mac(1) == "52:54:00:00:00:01"
    assert vpn_mac(0xABCDEF) == "52:54:00:ab:cd:ef"
    with pytest.raises(UsageError):
        vpn_mac(1 << 24)


@given(st.integers(min_value=1, max_value=(1 << 24) - 1))
def test_vpn_macs_locally_administered_unicast(index: int) -> None:
    first = int(vpn_mac(index)[:2], 16)
    assert first & 0x02 and not first & 0x01


def test_split_path() -> None:
    assert split_path("/walt-vpn/node/abc/boot.img") == (("walt-vpn", "node", "abc", "boot.img"),
                                                         {})
    assert split_path("/walt-vpn/node-conf/vpn-mac?mac=dc%3Aa6") == (
        ("walt-vpn", "node-conf", "vpn-mac"), {"mac": "dc:a6"})
    assert split_path("/walt-vpn/server/")[0] == ("walt-vpn", "server")
    for bad in ("/a/../b", "/a/%2e%2e/b", "/a/%2fetc", "/a//b", "/a/%00", "/a/%ff", "relative",
                "/a/%252e", "/a\\b", "/a?x=1&x=2", "/a#frag"):
        with pytest.raises(HttpError):
            split_path(bad)


@pytest.mark.parametrize("header,size,expected", [
    ("bytes=0-9", 100, (0, 9)), ("bytes=90-200", 100, (90, 99)), ("bytes=-10", 100, (90, 99)),
    ("bytes=-1000", 100, (0, 99)), ("bytes=50-", 100, (50, 99)), ("bytes=100-", 100, "416"),
    ("bytes=-0", 100, "416"), ("bytes=5-1", 100, None), ("bytes=0-1,4-5", 100, None),
    ("items=0-1", 100, None), ("bytes=a-b", 100, None), ("bytes=-", 100, None),
    ("bytes=" + "9" * 30 + "-", 100, None),
])
def test_parse_range(header: str, size: int, expected: Any) -> None:
    assert parse_range(header, size) == expected


def test_migrations(tmp_path: Path) -> None:
    path = tmp_path / "state" / "db.sqlite3"
    from server.db import MIGRATIONS

    # A database left at version 1 is migrated forward.
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in MIGRATIONS[0][1].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.commit()
    conn.close()
    db = Database(path)
    assert db.schema_version() == SCHEMA_VERSION
    assert db.integrity_check() == "ok"
    db.close()
    # A database from a newer server is refused, not damaged.
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="schema version"):
        Database(path)


def test_serve_with_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fwbuild.cli import main

    missing = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "absent.toml")])
    assert missing.exit_code == 2 and "server config not found" in missing.output
    typo = tmp_path / "server.toml"
    typo.write_text('[server]\nlisten_port = 80\n')
    result = CliRunner().invoke(main, ["nodes", "list", "--config", str(typo)])
    assert result.exit_code == 2
    # the message names the file and the key path in it (as for recipes)
    assert f"unknown key `listen_port` ({typo}: server.listen_port)" in result.output
    assert "Traceback" not in result.output


def test_example_config_parses() -> None:
    example = Path(__file__).resolve().parents[2] / "server" / "server.example.toml"
    config = load_config(example)
    assert config.ssh_entrypoint == Endpoint("vpn.example.org", 2222)
    assert config.admin.port == 8081


def test_bootconf_values_carry_http_port(tmp_path: Path) -> None:
    from server.nodeimg import NodeValues, bootconf_values

    config = parse_config(_with("entrypoints", "http", "boot.example.org:8080"), tmp_path)
    values = bootconf_values(config, NodeValues("dca632aabbcc", "52:54:00:00:00:07", "permissive",
                                                3, 1700000000, "H4sIAAAAAAAAA2"))
    assert values["http_port"] == 8080 and values["http_path"] == "walt-vpn/node/dca632aabbcc"
    extra = dict(values["extra"])  # type: ignore[call-overload]
    assert extra["WALT_VPN_ENTRYPOINT"] == "vpn.example.org:2222"
    assert extra["WALT_VPN_USER"] == "walt-vpn"
    assert list(extra)[-1] == "WALT_VPN_CREDS"
    default = parse_config(_base(), tmp_path)
    assert bootconf_values(default, NodeValues("dca632aabbcc", "52:54:00:00:00:07", "enforced",
                                               3, 1, "x"))["http_port"] is None
