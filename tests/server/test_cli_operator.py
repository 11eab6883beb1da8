"""The operator's CLI messages (issue 17): `fwbuild nodes ...`, `serve`, the server config,
`eeprom inspect/verify/diff`. One test per fixed message: what, where, hint, exit code."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fwbuild.cli import main
from tests.server_support import (  # noqa: F401 - fixtures
    server_env_fixture,
    write_config,
)

A, B = "dc:a6:32:aa:bb:cc", "dc:a6:32:00:00:01"


def _run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input)


@pytest.fixture
def site(server_env: dict[str, Path]) -> dict[str, Any]:
    from server.config import load_config
    from server.service import Service

    service = Service(load_config(server_env["config"]))
    try:
        for mac in (A, B):
            service.enroll(mac, client="127.0.0.1")
    finally:
        service.close()
    return {**server_env, "cfg": str(server_env["config"])}


def _nodes(site: dict[str, Any], *args: str, input: str | None = None) -> Result:
    return _run("nodes", *args, "--config", site["cfg"], input=input)


def _state(site: dict[str, Any], name: str) -> str:
    shown = _nodes(site, "show", name, "--json")
    assert shown.exit_code == 0, shown.output
    return str(json.loads(shown.output)["state"])


def test_nodes_list_never_creates_the_state_dir(server_env: dict[str, Path]) -> None:
    cfg = str(server_env["config"])
    assert not server_env["state"].exists()
    listed = _run("nodes", "list", "--config", cfg)
    assert listed.exit_code == 0
    assert "no node enrolled (no state database yet:" in listed.output
    assert str(server_env["state"]) in listed.output
    as_json = _run("nodes", "list", "--json", "--config", cfg)
    assert as_json.exit_code == 0 and json.loads(as_json.output) == []
    for args in (("show", A), ("label", A, "x"), ("revoke", A, "--yes"), ("forget", A, "--yes"),
                 ("set-mode", A, "enforced")):
        result = _run("nodes", *args, "--config", cfg)
        assert result.exit_code == 1, (args, result.output)
        assert ("Error: no node enrolled yet: the state database does not exist "
                f"({server_env['state']}/") in result.output
        assert "Hint: nodes enroll on their first boot" in result.output
    assert not server_env["state"].exists()


def test_label_then_name_nodes_by_label(site: dict[str, Any]) -> None:
    labelled = _nodes(site, "label", A, "rack1-pi")
    assert labelled.exit_code == 0 and labelled.output == f"{A}: label rack1-pi\n"
    shown = json.loads(_nodes(site, "show", "rack1-pi", "--json").output)
    assert shown["mac"] == A and shown["label"] == "rack1-pi"
    listed = _nodes(site, "list")
    assert listed.exit_code == 0
    line = next(ln for ln in listed.output.splitlines() if A in ln)
    assert line.startswith("rack1-pi ") and "never fetched" in line
    assert "times in UTC" in listed.output
    text = _nodes(site, "show", "rack1-pi", B)
    assert text.exit_code == 0 and text.output.count("VPN MAC:") == 2
    assert " UTC .. " in text.output and "enrolled:         20" in text.output
    both = json.loads(_nodes(site, "show", "rack1-pi", B, "--json").output)
    assert [n["mac"] for n in both] == [A, B]
    cleared = _nodes(site, "label", "rack1-pi", "--clear")
    assert cleared.exit_code == 0 and cleared.output == f"{A}: label removed\n"


@pytest.mark.parametrize(("args", "code", "fragments"), [
    (("label", A, "a b"), 2, ["Error: bad node label 'a b' (label)",
                              "Hint: 1-32 characters: letters, digits"]),
    (("label", A, "aabbccddeeff"), 2, ["label 'aabbccddeeff' reads as a MAC address (label)",
                                       "Hint: choose a name that is not 12 hex digits"]),
    (("label", A), 2, ["Error: give either NAME or --clear (nodes label)",
                       "fwbuild nodes label dc:a6:32:aa:bb:cc rack1-pi"]),
    (("show", "no such!"), 2, ["not a MAC address or node label: 'no such!' (node)",
                               "`fwbuild nodes label MAC NAME`"]),
    (("show", "ghost"), 1, ["Error: no node is labelled 'ghost' (node)",
                            "Hint: `fwbuild nodes list` shows every node with its label"]),
])
def test_node_name_messages(site: dict[str, Any], args: tuple[str, ...], code: int,
                            fragments: list[str]) -> None:
    result = _nodes(site, *args)
    assert result.exit_code == code, result.output
    for fragment in fragments:
        assert fragment in result.output
    assert "Traceback" not in result.output


def test_label_taken_by_another_node(site: dict[str, Any]) -> None:
    assert _nodes(site, "label", A, "rack1-pi").exit_code == 0
    taken = _nodes(site, "label", B, "rack1-pi")
    assert taken.exit_code == 1
    assert f"Error: label 'rack1-pi' already names {A} (label)" in taken.output
    assert f"Hint: remove it first: `fwbuild nodes label {A} --clear`" in taken.output


def test_set_mode_several_nodes(site: dict[str, Any]) -> None:
    assert _nodes(site, "label", A, "rack1-pi").exit_code == 0
    result = _nodes(site, "set-mode", "rack1-pi", B, "permissive", "--json")
    assert result.exit_code == 0, result.output
    infos = json.loads(result.output)
    assert [(n["mac"], n["boot_mode"], n["boot_mode_override"]) for n in infos] == \
        [(A, "permissive", "permissive"), (B, "permissive", "permissive")]
    back = _nodes(site, "set-mode", B, "default")
    assert back.exit_code == 0 and f"{B}: boot mode enforced (site default)" in back.output


def test_revoke_confirms_and_revoke_twice_says_so(site: dict[str, Any]) -> None:
    declined = _nodes(site, "revoke", A, input="n\n")
    assert declined.exit_code == 2
    assert f"Revoke {A}? Their certificates stop working at once" in declined.output
    assert "Error: revoke not confirmed: nothing changed (nodes revoke)" in declined.output
    assert "Hint: answer y, or pass --yes (scripts)" in declined.output
    assert _state(site, A) == "enrolled"
    accepted = _nodes(site, "revoke", A, input="y\n")
    assert accepted.exit_code == 0 and f"{A}: revoked (certificate serial" in accepted.output
    assert _state(site, A) == "revoked"
    again = _nodes(site, "revoke", A, "--yes")
    assert again.exit_code == 0
    assert again.output.startswith(f"{A}: already revoked (since 20")
    assert " UTC); nothing changed" in again.output
    as_json = json.loads(_nodes(site, "revoke", A, "--yes", "--json").output)
    assert as_json[0]["already_revoked"] is True


def test_set_mode_on_revoked_node_is_an_error(site: dict[str, Any]) -> None:
    assert _nodes(site, "revoke", A, "--yes").exit_code == 0
    result = _nodes(site, "set-mode", A, "permissive")
    assert result.exit_code == 1
    assert (f"Error: node {A} is revoked: it has no boot mode (nothing changed) "
            f"(nodes set-mode {A})") in result.output
    assert f"Hint: `fwbuild nodes forget {A}`, then let it enroll again" in result.output
    assert "None" not in result.output
    as_json = _nodes(site, "set-mode", B, A, "enforced", "--json")
    error = json.loads(as_json.output)
    assert as_json.exit_code == 1 and error["exit_code"] == 1 and "is revoked" in error["error"]
    shown = json.loads(_nodes(site, "show", B, "--json").output)
    assert shown["boot_mode_override"] is None  # nothing changed on the other node either


def test_unknown_node_among_several_changes_nothing(site: dict[str, Any]) -> None:
    result = _nodes(site, "revoke", A, "ghost", "--yes")
    assert result.exit_code == 1 and "no node is labelled 'ghost'" in result.output
    assert _state(site, A) == "enrolled"
    as_json = _nodes(site, "show", "dc:a6:32:99:99:99", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.output)["error"] == "unknown node dc:a6:32:99:99:99"


def test_forget_confirms(site: dict[str, Any]) -> None:
    declined = _nodes(site, "forget", A, B, input="\n")
    assert declined.exit_code == 2 and "Error: forget not confirmed: nothing changed" in declined.output
    forgotten = _nodes(site, "forget", A, B, "--yes", "--json")
    assert forgotten.exit_code == 0 and json.loads(forgotten.output) == {"forgotten": [A, B]}
    assert _nodes(site, "list").output.startswith("no node enrolled")


# -- server configuration and start ------------------------------------------------------
def test_missing_server_toml_points_to_the_example(tmp_path: Path) -> None:
    missing = tmp_path / "server.toml"
    for args in (("serve", "--check"), ("nodes", "list")):
        result = _run(*args, "--config", str(missing))
        assert result.exit_code == 2
        assert f"Error: server config not found ({missing})" in result.output
        assert "Hint: copy server/server.example.toml" in result.output
        assert "--config PATH (or set FWBUILD_SERVER_CONFIG)" in result.output
    as_json = _run("nodes", "list", "--json", "--config", str(missing))
    assert as_json.exit_code == 2
    error = json.loads(as_json.output)
    assert error["error"] == "server config not found" and error["where"] == str(missing)
    assert "server/server.example.toml" in error["hint"] and error["exit_code"] == 2


def test_admin_port_equal_to_server_port_refused(server_env: dict[str, Path]) -> None:
    root = server_env["root"]
    cfg = write_config(root / "same.toml", artifacts=server_env["artifacts"],
                       state=root / "state2", keys=server_env["keys"], port=8090,
                       admin_port=8090)
    result = _run("serve", "--check", "--config", str(cfg))
    assert result.exit_code == 2
    assert f"Error: admin.port 8090 is also server.port ({cfg}: admin.port)" in result.output
    assert "Hint: the admin listener needs its own port: e.g. admin.port = 8091" in result.output


@pytest.mark.parametrize("which", ["node", "admin"])
def test_serve_names_the_listener_in_use(server_env: dict[str, Path], which: str) -> None:
    root = server_env["root"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = write_config(root / "busy.toml", artifacts=server_env["artifacts"],
                           state=server_env["state"], keys=server_env["keys"],
                           port=port if which == "node" else 0,
                           admin_port=port if which == "admin" else 0)
        result = _run("serve", "--config", str(cfg))
    section = "server" if which == "node" else "admin"
    assert result.exit_code == 1, result.output
    assert (f"Error: the {which} listener cannot listen on 127.0.0.1:{port}: address already "
            f"in use ([{section}] listen/port)") in result.output
    assert f"Hint: another process listens there (`ss -ltnp 'sport = :{port}'`" in result.output
    assert f"change [{section}] listen/port in the config" in result.output


# -- eeprom inspect / verify / diff ------------------------------------------------------
@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    plain, stamped = tmp_path / "a.bin", tmp_path / "b.bin"
    assert _run("eeprom", "synth", str(plain)).exit_code == 0
    assert _run("eeprom", "edit", str(plain), "--out", str(stamped),
                "--timestamp", "1767225600").exit_code == 0
    return plain, stamped


def test_eeprom_dates_beside_epochs(images: tuple[Path, Path]) -> None:
    _, stamped = images
    shown = _run("eeprom", "inspect", str(stamped))
    assert "timestamp:    1767225600 (2026-01-01 00:00:00 UTC)" in shown.output
    verified = _run("eeprom", "verify", str(stamped))
    assert verified.exit_code == 0
    assert "timestamp 1767225600 (2026-01-01 00:00:00 UTC)" in verified.output


def test_eeprom_json_results_and_errors(images: tuple[Path, Path], tmp_path: Path) -> None:
    plain, stamped = images
    info = json.loads(_run("eeprom", "inspect", "--json", str(stamped)).output)
    assert info["timestamp"] == 1767225600 and info["board"].startswith("Raspberry Pi 5")
    verified = json.loads(_run("eeprom", "verify", "--json", str(stamped)).output)
    assert verified["ok"] is True and verified["soc"] == "2712" and verified["signed"] is False
    diff = _run("eeprom", "diff", "--json", str(plain), str(stamped))
    assert diff.exit_code == 1
    assert json.loads(diff.output) == {"identical": False, "a": str(plain), "b": str(stamped),
                                       "differences": ["timestamp: None -> 1767225600"]}
    same = _run("eeprom", "diff", "--json", str(plain), str(plain))
    assert same.exit_code == 0 and json.loads(same.output)["identical"] is True
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 100)
    for command in ("inspect", "verify"):
        result = _run("eeprom", command, "--json", str(bad))
        assert result.exit_code == 1
        error = json.loads(result.output)
        assert error["error"] == "EEPROM image is 100 bytes, not 524288 (2711) or 2097152 (2712)"
        assert error["where"] == str(bad) and error["exit_code"] == 1
        assert "2 MiB" in error["hint"]
