"""Node address binding, config file safety, no fake firmware, events, file hygiene and the
parser strictness the fuzzer asked for (cpio fields, .sig)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from fwbuild.errors import FormatError, RecipeError
from tests.server_support import (  # noqa: F401 - fixtures
    HOST_KEY_LINE,
    copy_keys,
    enroll,
    file_mode,
    make_artifacts,
    node_ip,
    request,
    running_fixture,
    server_env_fixture,
    write_config,
)

MAC12 = "dca632aabbcc"


# -- node addresses ---------------------------------------------------------------------------

def test_node_address_file(tmp_path: Path) -> None:
    from server.config import parse_node_addresses

    table = parse_node_addresses("# walt-net\n\nDC:A6:32:00:00:01  192.168.152.10  # n1\n"
                                 "dc-a6-32-00-00-02 fe80::1\n", "nodes.txt")
    assert table == {"192.168.152.10": "dca632000001", "fe80::1": "dca632000002"}
    for text, line, what in (
        ("dc:a6:32:00:00:01\n", 1, "expected `MAC IP`"),
        ("# x\nzz:a6:32:00:00:01 10.0.0.1\n", 2, "not a MAC address"),
        ("dc:a6:32:00:00:01 10.0.0.300\n", 1, "not an IP address"),
        ("dc:a6:32:00:00:01 10.0.0.1\ndc:a6:32:00:00:02 10.0.0.1\n", 2, "bound to two MACs"),
        ("01:00:5e:00:00:01 10.0.0.1\n", 1, "multicast"),
    ):
        with pytest.raises(RecipeError) as info:
            parse_node_addresses(text, "nodes.txt")
        assert info.value.where == f"nodes.txt:{line}" and what in info.value.what


def test_bad_node_address_file_stops_serve(server_env: dict[str, Path]) -> None:
    bad = server_env["root"] / "bad-nodes.txt"
    bad.write_text("dc:a6:32:00:00:01 10.0.0.1\nnonsense\n")
    config = write_config(server_env["root"] / "bad.toml", artifacts=server_env["artifacts"],
                          state=server_env["state"], keys=server_env["keys"],
                          extra=f'node_addresses = "{bad}"')
    result = CliRunner().invoke(main, ["serve", "--check", "--config", str(config)])
    assert result.exit_code == 2
    assert f"{bad}:2" in result.output and "Traceback" not in result.output


def test_neighbour_table_lookup(tmp_path: Path) -> None:
    from server.identity import arp_lookup

    table = tmp_path / "arp"
    table.write_text(
        "IP address       HW type     Flags       HW address            Mask     Device\n"
        "192.168.152.10   0x1         0x2         dc:a6:32:00:00:01     *        walt-net\n"
        "192.168.152.11   0x1         0x0         00:00:00:00:00:00     *        walt-net\n"
        "192.168.152.12   0x1         0x2         dc:a6:32:00:00:03     *        eth0\n")
    assert arp_lookup("192.168.152.10", "walt-net", str(table)) == "dca632000001"
    assert arp_lookup("192.168.152.10", None, str(table)) == "dca632000001"
    assert arp_lookup("192.168.152.11", "walt-net", str(table)) is None  # incomplete
    assert arp_lookup("192.168.152.12", "walt-net", str(table)) is None  # other interface
    assert arp_lookup("192.168.152.99", None, str(table)) is None


def test_unbound_addresses_get_a_reason(running: Any) -> None:
    reply = request(running.port, "GET", "/walt-vpn/node-conf/creds", source="127.0.0.1")
    assert reply.status == 403 and "no node is bound to address 127.0.0.1" in reply.json()["error"]
    reply = request(running.port, "GET", "/walt-vpn/node-conf/creds", source="127.200.0.2")
    assert reply.status == 403 and "not on the enrollment subnets" in reply.json()["error"]


# -- config files -----------------------------------------------------------------------------

@pytest.mark.parametrize("value,what", [
    ("\u0000", "NUL"), ("keys\u0000.txt", "NUL"), ("/dev/zero", "not a regular file"),
    ("/", "not a regular file"), ("big.keys", "larger than"), ("missing.keys", "cannot read"),
])
def test_host_keys_file_is_checked(tmp_path: Path, value: str, what: str) -> None:
    from server.config import parse_config

    (tmp_path / "big.keys").write_bytes(b"#" * (2 << 20))
    data = {"server": {"artifacts": "out", "state_dir": "state", "keys_dir": "keys",
                       "enrollment_subnets": ["10.0.0.0/8"], "node_root": "/srv/{mac12}"},
            "entrypoints": {"http": "x.example", "ssh": "x.example", "ssh_host_keys_file": value}}
    with pytest.raises(RecipeError) as info:
        parse_config(data, tmp_path)
    assert what in info.value.what and info.value.where == "entrypoints.ssh_host_keys_file"


def test_config_paths_with_nul_and_special_files(tmp_path: Path) -> None:
    from server.config import load_config, parse_config

    data = {"server": {"artifacts": "o\u0000ut", "state_dir": "state", "keys_dir": "keys",
                       "enrollment_subnets": ["10.0.0.0/8"], "node_root": "/srv/{mac12}"},
            "entrypoints": {"http": "x.example", "ssh": "x.example",
                            "ssh_host_keys": [HOST_KEY_LINE]}}
    with pytest.raises(RecipeError, match="NUL"):
        parse_config(data, tmp_path)
    with pytest.raises(RecipeError, match="not a regular file"):
        load_config(Path("/dev/zero"))
    (tmp_path / "huge.toml").write_bytes(b"#" * (2 << 20))
    with pytest.raises(RecipeError, match="larger than"):
        load_config(tmp_path / "huge.toml")


# -- no fake firmware, --check -----------------------------------------------------------------

def _real_set(server_env: dict[str, Path]) -> Path:
    """Mark the test set as built from a non-virtual recipe."""
    manifest = server_env["artifacts"] / "manifest.json"
    data = json.loads(manifest.read_text())
    data["recipe"]["target"] = "pi5"
    manifest.write_text(json.dumps(data))
    return server_env["artifacts"]


def test_wrong_artifacts_path_stops_serve_and_check(server_env: dict[str, Path]) -> None:
    nowhere = server_env["root"] / "no-such-set"
    config = write_config(server_env["root"] / "wrong.toml", artifacts=nowhere,
                          state=server_env["state"], keys=server_env["keys"])
    runner = CliRunner()
    for args in (["serve", "--check"], ["serve"]):
        result = runner.invoke(main, [*args, "--config", str(config)])
        assert result.exit_code != 0 and str(nowhere) in result.output, result.output
        assert "Traceback" not in result.output
    good = runner.invoke(main, ["serve", "--check", "--config", str(server_env["config"])])
    assert good.exit_code == 0 and "OK" in good.output, good.output


def test_real_set_without_eeprom_base_is_refused(server_env: dict[str, Path]) -> None:
    _real_set(server_env)
    result = CliRunner().invoke(main, ["serve", "--check", "--config", str(server_env["config"])])
    assert result.exit_code != 0
    assert "eeprom/enforced/pieeprom.bin" in result.output and "virtual recipe" in result.output


def test_no_synthetic_image_outside_virtual_sets(server_env: dict[str, Path]) -> None:
    """Even past the start check (a base removed while serving), a real set never gets a
    synthetic image: the node's pieeprom.bin answers 503 naming the missing file."""
    from fwbuild.eeprom.synthetic import synthetic_image
    from server.config import load_config
    from server.run import start_server

    artifacts = _real_set(server_env)
    for mode in ("enforced", "permissive"):
        base = artifacts / "eeprom" / mode / "pieeprom.bin"
        base.parent.mkdir(parents=True)
        base.write_bytes(synthetic_image("ab"))
    srv = start_server(load_config(server_env["config"]))
    try:
        assert enroll(srv.port, MAC12).status == 201
        (artifacts / "eeprom" / "enforced" / "pieeprom.bin").unlink()
        srv.service.renderer._memory.clear()
        srv.service.set_mode(MAC12, "permissive")
        srv.service.set_mode(MAC12, None)  # back to enforced, whose base is gone
    except Exception as exc:  # noqa: BLE001 - set_mode re-renders: it must fail typed
        assert "no EEPROM base image" in str(exc)
        reply = request(srv.port, "GET", f"/walt-vpn/node/{MAC12}/pieeprom.bin",
                        source=node_ip(MAC12))
        assert reply.status == 503 and "no EEPROM base image" in reply.json()["error"]
    else:
        raise AssertionError("rendering without a base image succeeded")
    finally:
        srv.stop()


# -- events, hygiene ----------------------------------------------------------------------------

def test_events_are_pruned_by_count_and_age(server_env: dict[str, Path]) -> None:
    from server.config import load_config
    from server.service import PRUNE_EVERY, Service

    config = write_config(server_env["root"] / "prune.toml", artifacts=server_env["artifacts"],
                          state=server_env["state"], keys=server_env["keys"],
                          extra="events_max_count = 150\nevents_max_age_days = 1")
    service = Service(load_config(config))
    try:
        node = service.enroll(MAC12)
        row = service.node(node.mac.replace(":", ""))
        with service.db.transaction() as conn:  # an old event
            conn.execute("INSERT INTO events(node_mac, artifact, time, result, client) "
                         "VALUES (?, 'boot.img', 1000, '200', 'x')", (row.mac,))
        for _ in range(3 * PRUNE_EVERY):
            service.record(row, "eeprom-digest", "200", "127.1.187.204")
        with service.db.connection() as conn:
            count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            oldest = conn.execute("SELECT min(time) FROM events").fetchone()[0]
            indexes = {r[1] for r in conn.execute("PRAGMA index_list(events)")}
        assert count <= 150 + PRUNE_EVERY and oldest > 1000
        assert "events_time" in indexes
    finally:
        service.close()


def test_stale_temp_files_removed_and_modes(server_env: dict[str, Path]) -> None:
    from server.config import load_config
    from server.service import Service

    stale = server_env["state"] / "eeprom" / MAC12 / ".enforced-1-abc.bin.gz.x1y2.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half-written")
    keep = stale.parent / "enforced-1-abc.bin.gz"
    keep.write_bytes(b"x")
    os.chmod(server_env["state"], 0o755)
    service = Service(load_config(server_env["config"]))
    service.close()
    assert not stale.exists() and keep.exists()
    assert file_mode(server_env["state"]) == 0o700


def test_keys_init_directory_is_private(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keys", "init", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert file_mode(tmp_path / "k") == 0o700


def test_migration_3_indexes_events(tmp_path: Path) -> None:
    from server.db import SCHEMA_VERSION, Database

    db = Database(tmp_path / "s.sqlite3")
    db.close()
    conn = sqlite3.connect(tmp_path / "s.sqlite3")
    assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    assert SCHEMA_VERSION >= 3
    conn.close()


# -- parser strictness (fuzz findings) ----------------------------------------------------------

@pytest.mark.parametrize("field", ["-0000001", "+0000fff", " 0x0001f", "0000_100", "00000 10",
                                   "0000001\n", "\u00b2"])
def test_cpio_fields_are_exactly_8_hex_digits(field: str) -> None:
    from fwbuild.initramfs.cpio import CpioEntry, read_cpio, write_cpio

    data = bytearray(write_cpio([CpioEntry(name="a", mode=0o100644, data=b"hi")]))
    raw = field.encode("utf-8")[:8].ljust(8, b"0")
    data[6 + 6 * 8:6 + 7 * 8] = raw  # filesize
    with pytest.raises(FormatError, match="hexadecimal"):
        read_cpio(bytes(data))


@pytest.mark.parametrize("text", [
    b"%s\nts: 01\n", b"%s\nts: 4294967296\n", b"%s\nts: 1\ntarget-soc: 27 12\n",
    b"%s\nts: 1\ntarget-soc: 2712\n\n", b"%s\nts: 1", b"%s\nts: 1\n\ntarget-soc: 2712\n",
    b"%s\nts: 1\ntarget-soc: UPPER\n",
])
def test_parse_sig_is_as_strict_as_build_sig(text: bytes) -> None:
    from fwbuild.sign import build_sig, parse_sig

    digest = b"a" * 64
    with pytest.raises(FormatError):
        parse_sig(text % digest)
    good = build_sig(b"x", 1, target_soc="2712")
    assert parse_sig(good).ts == 1


def test_fuzz_bench_smoke() -> None:
    """bench/fuzz.py on a few inputs per parser: no crash (the full run: 100k each)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("fuzz_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--count", "300", "--seed", "7"]) == 0


def test_node_address_file_reloads_when_changed(running: Any, server_env: dict[str, Path],
                                                caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import time

    other = "dca632aaaaaa"  # not in the file yet
    assert enroll(running.port, MAC12).status == 201
    assert request(running.port, "GET", "/walt-vpn/node-conf/creds",
                   source="127.0.0.9").status == 403
    addresses = server_env["root"] / "node-addresses.txt"
    text = addresses.read_text()
    time.sleep(0.01)
    addresses.write_text(text.replace(f"{MAC12} {node_ip(MAC12)}\n", f"{MAC12} 127.0.0.9\n")
                         + f"{other} 127.0.0.10\n")
    assert request(running.port, "GET", "/walt-vpn/node-conf/creds",
                   source="127.0.0.9").status == 200
    assert request(running.port, "GET", "/walt-vpn/node-conf/creds",
                   source=node_ip(MAC12)).status == 403  # the old address is no longer bound
    # A broken version is logged and the last good table stays.
    caplog.set_level(logging.ERROR, logger="fwbuild.server")
    addresses.write_text("nonsense\n")
    assert request(running.port, "GET", "/walt-vpn/node-conf/creds",
                   source="127.0.0.9").status == 200
    assert any("not reloaded" in r.getMessage() for r in caplog.records)
