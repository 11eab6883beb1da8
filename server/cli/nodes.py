"""`fwbuild nodes ...`: list, show, label and administer enrolled nodes.

The commands open the server's state database directly (SQLite WAL lets them run beside a
live server; writers wait for each other) and rewrite the RevokedKeys file under the same
lock as the server, so they work whether or not the server runs. A node is named by its
MAC (any of dc:a6:32:aa:bb:cc, dc-a6-..., dca632aabbcc) or by its label; the commands
that change nodes take several, resolve them all first and change nothing when one is
unknown. Times are UTC.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..db import NodeRow
    from ..service import Service

from fwbuild.cli._common import emit_json, json_option
from fwbuild.errors import UsageError

from .serve import config_option


def when(ts: int | None) -> str:
    return "never" if ts is None else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


@contextlib.contextmanager
def _service(config_path: Path) -> Iterator[Service]:
    """The server's core on its state database; without a database (no node ever
    enrolled) an error, and nothing is created."""
    from server.config import load_config
    from server.db import state_exists
    from server.errors import NotFound
    from server.service import Service

    config = load_config(config_path)
    if not state_exists(config):
        raise NotFound("no node enrolled yet: the state database does not exist",
                       str(config.database), "nodes enroll on their first boot; check "
                       "[server] state_dir in the config")
    service = Service(config)
    try:
        yield service
    finally:
        service.close()


def _resolve(service: Service, names: tuple[str, ...]) -> list[NodeRow]:
    """The nodes named (MACs or labels), each once, in the order given; all or an error."""
    found: dict[str, NodeRow] = {}
    for name in names:
        node = service.find(name)
        found.setdefault(node.mac, node)
    return list(found.values())


def _confirm(action: str, nodes: list[NodeRow], consequence: str, yes: bool) -> None:
    if yes:
        return
    from server.macs import colon_mac

    names = ", ".join(f"{n.label} ({colon_mac(n.mac)})" if n.label else colon_mac(n.mac)
                      for n in nodes)
    try:
        click.confirm(f"{action} {names}? {consequence}", abort=True, err=True)
    except click.Abort:
        raise UsageError(f"{action.lower()} not confirmed: nothing changed", f"nodes {action.lower()}",
                         "answer y, or pass --yes (scripts)") from None


def _eeprom_text(info: dict[str, Any]) -> str:
    if info["state"] != "enrolled":
        return "-"
    expected, fetched = info["eeprom_digest"], info["fetched_eeprom_digest"]
    if expected is None:
        return "not rendered"
    if fetched is None:
        return "never fetched"
    return "up to date" if fetched == expected else "will re-flash"


@click.group("nodes")
def nodes_group() -> None:
    """List and administer enrolled nodes (works beside a running server).

    NODE is a MAC (dc:a6:32:aa:bb:cc, dca632aabbcc) or a label set with `nodes label`.
    """


@nodes_group.command("list")
@config_option
@json_option
def nodes_list(config_path: Path, as_json: bool) -> None:
    """One line per node: name, MAC, state, boot mode, last boot (UTC), EEPROM status."""
    from server.config import load_config
    from server.db import state_exists

    config = load_config(config_path)
    if not state_exists(config):  # a read never creates the state directory
        if as_json:
            emit_json([])
        else:
            click.echo(f"no node enrolled (no state database yet: {config.database})")
        return
    with _service(config_path) as service:
        nodes = [service.describe(n) for n in service.nodes()]
    if as_json:
        emit_json(nodes)
        return
    if not nodes:
        click.echo("no node enrolled")
        return
    click.echo(f"{'NAME':16}  {'MAC':17}  {'STATE':8}  {'MODE':11}  {'LAST BOOT':20}  EEPROM")
    for n in nodes:
        mode = n["boot_mode"] + ("" if n["boot_mode_override"] else "*")
        click.echo(f"{n['label'] or '-':16}  {n['mac']:17}  {n['state']:8}  {mode:11}  "
                   f"{when(n['last_boot']):20}  {_eeprom_text(n)}")
    click.echo("(* = site default; times in UTC)")


@nodes_group.command("show")
@click.argument("nodes", nargs=-1, required=True, metavar="NODE...")
@config_option
@json_option
def nodes_show(nodes: tuple[str, ...], config_path: Path, as_json: bool) -> None:
    """Everything about nodes: certificate, expected and fetched EEPROM, recent events.

    With --json: one object for one NODE, a list for several."""
    with _service(config_path) as service:
        infos = [service.describe(n, events=20) for n in _resolve(service, nodes)]
    if as_json:
        emit_json(infos[0] if len(nodes) == 1 else infos)
        return
    for index, info in enumerate(infos):
        if index:
            click.echo("")
        _print_node(info)


def _print_node(info: dict[str, Any]) -> None:
    cert = info["certificate"]
    for label, value in (
        ("MAC", info["mac"]), ("label", info["label"] or "-"), ("VPN MAC", info["vpn_mac"]),
        ("state", info["state"]),
        ("boot mode", info["boot_mode"] + ("" if info["boot_mode_override"] else
                                           " (site default)")),
        ("HTTP path", info["http_path"]), ("root", info["root"]),
        ("expected EEPROM", info["eeprom_digest"] or "-"),
        ("fetched EEPROM", (info["fetched_eeprom_digest"] or "-") +
         (f" at {when(info['fetched_eeprom_at'])}" if info["fetched_eeprom_at"] else "")
         + f" ({_eeprom_text(info)})"),
        ("enrolled", when(info["enrolled_at"])), ("last seen", when(info["last_seen"])),
        ("last boot", when(info["last_boot"])),
        ("certificate", f"serial {cert['serial']}, key id {cert['key_id']}, valid "
                        f"{when(cert['valid_after'])} .. {when(cert['valid_before'])}"
                        + (f", REVOKED {when(cert['revoked_at'])}" if cert["revoked_at"] else "")),
    ):
        click.echo(f"{label + ':':17} {value}")
    for event in info["events"]:
        click.echo(f"  {when(event['time'])}  {event['artifact']:14} {event['result']:12} "
                   f"{event['client'] or ''}")


@nodes_group.command("label")
@click.argument("node", metavar="NODE")
@click.argument("name", required=False)
@click.option("--clear", is_flag=True, help="Remove the node's label.")
@config_option
@json_option
def nodes_label(node: str, name: str | None, clear: bool, config_path: Path, as_json: bool) -> None:
    """Name a node (NAME: 1-32 letters, digits, '.', '_', '-'); commands then accept NAME."""
    if (name is None) == (not clear):
        raise UsageError("give either NAME or --clear", "nodes label",
                         "e.g. `fwbuild nodes label dc:a6:32:aa:bb:cc rack1-pi`")
    with _service(config_path) as service:
        info = service.describe(service.set_label(service.find(node).mac, name))
    if as_json:
        emit_json(info)
    else:
        click.echo(f"{info['mac']}: label {info['label'] or 'removed'}")


@nodes_group.command("set-mode")
@click.argument("nodes", nargs=-1, required=True, metavar="NODE...")
@click.argument("mode", type=click.Choice(["enforced", "permissive", "default"]))
@config_option
@json_option
def nodes_set_mode(nodes: tuple[str, ...], mode: str, config_path: Path, as_json: bool) -> None:
    """Override the boot mode of nodes (`default`: follow the site). Their EEPROM changes at once.

    A revoked node has no boot mode: that is an error (and nothing is changed)."""
    from server.errors import Conflict
    from server.macs import colon_mac

    with _service(config_path) as service:
        found = _resolve(service, nodes)
        revoked = [n for n in found if n.state != "enrolled"]
        if revoked:
            first = colon_mac(revoked[0].mac)
            raise Conflict(f"node {first} is revoked: it has no boot mode (nothing changed)",
                           f"nodes set-mode {first}",
                           f"`fwbuild nodes forget {first}`, then let it enroll again")
        infos = [service.describe(service.set_mode(n.mac, None if mode == "default" else mode))
                 for n in found]
    if as_json:
        emit_json(infos)
        return
    for info in infos:
        click.echo(f"{info['mac']}: boot mode {info['boot_mode']}"
                   + ("" if info["boot_mode_override"] else " (site default)")
                   + f", expected EEPROM {info['eeprom_digest']}")


@nodes_group.command("revoke")
@click.argument("nodes", nargs=-1, required=True, metavar="NODE...")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@config_option
@json_option
def nodes_revoke(nodes: tuple[str, ...], yes: bool, config_path: Path, as_json: bool) -> None:
    """Revoke nodes: their certificates go to RevokedKeys, their boot paths answer 403.

    A node already revoked is left as it is (and said so)."""
    with _service(config_path) as service:
        found = _resolve(service, nodes)
        todo = [n for n in found if n.state == "enrolled"]
        if todo:
            _confirm("Revoke", todo, "Their certificates stop working at once; to come back "
                     "they must be forgotten and enroll again.", yes)
        results = []
        for node in found:
            already = node.state != "enrolled"
            info = service.describe(node if already else service.revoke(node.mac))
            info["already_revoked"] = already
            results.append(info)
        revoked_keys = service.config.revoked_keys_file
    if as_json:
        emit_json(results)
        return
    for info in results:
        cert = info["certificate"]
        if info["already_revoked"]:
            click.echo(f"{info['mac']}: already revoked (since {when(cert['revoked_at'])}); "
                       "nothing changed")
        else:
            click.echo(f"{info['mac']}: revoked (certificate serial {cert['serial']}); "
                       f"RevokedKeys: {revoked_keys}")


@nodes_group.command("forget")
@click.argument("nodes", nargs=-1, required=True, metavar="NODE...")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@config_option
@json_option
def nodes_forget(nodes: tuple[str, ...], yes: bool, config_path: Path, as_json: bool) -> None:
    """Remove nodes (their certificates stay revoked); they may then enroll again."""
    from server.macs import colon_mac

    with _service(config_path) as service:
        found = _resolve(service, nodes)
        _confirm("Forget", found, "Their records, labels and events go; their certificates "
                 "stay revoked.", yes)
        for node in found:
            service.forget(node.mac)
    macs = [colon_mac(n.mac) for n in found]
    if as_json:
        emit_json({"forgotten": macs})
        return
    for mac in macs:
        click.echo(f"{mac}: forgotten")


COMMANDS = [nodes_group]
