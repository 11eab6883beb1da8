"""Commands: serve, nodes, entrypoint (the server side; the core lives in `server/`).

`fwbuild nodes ...` opens the server's state database directly (SQLite WAL lets it run
beside a live server; writers wait for each other) and rewrites the RevokedKeys file
under the same lock as the server, so it works whether or not the server runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_CONFIG = "server.toml"


def config_option(func: F) -> F:
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
        default=lambda: os.environ.get("FWBUILD_SERVER_CONFIG", DEFAULT_CONFIG),
        show_default="$FWBUILD_SERVER_CONFIG or server.toml",
        help="Server configuration (TOML).")(func)


@contextlib.contextmanager
def _service(config_path: Path) -> Iterator[Any]:
    """The server's core on its state database (safe beside a running server), closed after use."""
    from server.config import load_config
    from server.service import Service

    service = Service(load_config(config_path))
    try:
        yield service
    finally:
        service.close()


def _echo(info: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(info, indent=2, sort_keys=True) if as_json else text)


@click.command("serve")
@config_option
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, help="One line per response at info.")
def serve(config_path: Path, log_level: str) -> None:
    """Serve artifacts to nodes, enroll them, track their boot modes (until SIGTERM)."""
    from server.config import load_config
    from server.run import run_server

    config = load_config(config_path)
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(running: Any) -> None:
        click.echo(f"fwbuild server: nodes on http://{config.listen}:{running.port}/walt-vpn/, "
                   f"admin on http://{config.admin.listen}:{running.admin_port}/", err=True)

    run_server(config, ready)


@click.group("nodes")
def nodes_group() -> None:
    """List and administer enrolled nodes (works beside a running server)."""


def _when(ts: int | None) -> str:
    return "never" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


@nodes_group.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def nodes_list(config_path: Path, as_json: bool) -> None:
    """One line per node: MAC, VPN MAC, state, boot mode, last boot, expected EEPROM."""
    with _service(config_path) as service:
        nodes = [service.describe(n) for n in service.nodes()]
    if as_json or not nodes:
        _echo(nodes, as_json, "no node enrolled")
        return
    click.echo(f"{'MAC':17}  {'VPN MAC':17}  {'STATE':8}  {'MODE':11}  {'LAST BOOT':16}  EEPROM")
    for n in nodes:
        mode = n["boot_mode"] + ("" if n["boot_mode_override"] else "*")
        click.echo(f"{n['mac']:17}  {n['vpn_mac']:17}  {n['state']:8}  {mode:11}  "
                   f"{_when(n['last_boot']):16}  {(n['eeprom_digest'] or '-')[:16]}")
    click.echo("(* = site default)")


@nodes_group.command("show")
@click.argument("mac")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def nodes_show(mac: str, config_path: Path, as_json: bool) -> None:
    """Everything about one node: certificate, EEPROM digest, recent events."""
    with _service(config_path) as service:
        info = service.describe(service.node(mac), events=20)
    if as_json:
        _echo(info, as_json, "")
        return
    cert = info["certificate"]
    for label, value in (
        ("MAC", info["mac"]), ("VPN MAC", info["vpn_mac"]), ("state", info["state"]),
        ("boot mode", info["boot_mode"] + ("" if info["boot_mode_override"] else
                                           " (site default)")),
        ("HTTP path", info["http_path"]), ("root", info["root"]),
        ("expected EEPROM", info["eeprom_digest"] or "-"),
        ("enrolled", _when(info["enrolled_at"])), ("last seen", _when(info["last_seen"])),
        ("last boot", _when(info["last_boot"])),
        ("certificate", f"serial {cert['serial']}, key id {cert['key_id']}, valid "
                        f"{_when(cert['valid_after'])} .. {_when(cert['valid_before'])}"
                        + (f", REVOKED {_when(cert['revoked_at'])}" if cert["revoked_at"] else "")),
    ):
        click.echo(f"{label + ':':17} {value}")
    for event in info["events"]:
        click.echo(f"  {_when(event['time'])}  {event['artifact']:14} {event['result']:12} "
                   f"{event['client'] or ''}")


@nodes_group.command("set-mode")
@click.argument("mac")
@click.argument("mode", type=click.Choice(["enforced", "permissive", "default"]))
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def nodes_set_mode(mac: str, mode: str, config_path: Path, as_json: bool) -> None:
    """Override a node's boot mode (`default`: follow the site). Its EEPROM digest changes at once."""
    with _service(config_path) as service:
        info = service.describe(service.set_mode(mac, None if mode == "default" else mode))
    _echo(info, as_json, f"{info['mac']}: boot mode {info['boot_mode']}, "
                         f"expected EEPROM {info['eeprom_digest']}")


@nodes_group.command("revoke")
@click.argument("mac")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def nodes_revoke(mac: str, config_path: Path, as_json: bool) -> None:
    """Revoke a node: its certificate goes to RevokedKeys, its boot paths answer 403."""
    with _service(config_path) as service:
        info = service.describe(service.revoke(mac))
        revoked_keys = service.config.revoked_keys_file
    _echo(info, as_json, f"{info['mac']}: revoked (certificate serial {info['certificate']['serial']}); "
                         f"RevokedKeys: {revoked_keys}")


@nodes_group.command("forget")
@click.argument("mac")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def nodes_forget(mac: str, config_path: Path, as_json: bool) -> None:
    """Remove a node (its certificates stay revoked); it may then enroll again."""
    with _service(config_path) as service:
        node = service.node(mac)
        service.forget(mac)
    from server.macs import colon_mac

    _echo({"forgotten": colon_mac(node.mac)}, as_json, f"{colon_mac(node.mac)}: forgotten")


@click.group("entrypoint")
def entrypoint_group() -> None:
    """Print the setup of the site's HTTP and SSH entrypoints."""


def _server_endpoint(text: str | None, config_path: Path, default_port: int | None) -> Any:
    from server.config import load_config, parse_endpoint

    if text:
        return parse_endpoint(text, default_port or 80, "--server")
    config = load_config(config_path)
    return parse_endpoint(config.hostname, default_port or config.port, "server.hostname")


@entrypoint_group.command("http")
@click.option("--nginx", "kind", flag_value="nginx", help="nginx `location` block.")
@click.option("--haproxy", "kind", flag_value="haproxy", help="HAProxy frontend + backend.")
@click.option("--apache", "kind", flag_value="apache", help="Apache VirtualHost (mod_proxy).")
@click.option("--server", "server_text", metavar="HOST[:PORT]",
              help="The fwbuild server (default: hostname and port from --config).")
@click.option("--listen-port", type=int, default=80, show_default=True,
              help="Port the proxy listens on.")
@config_option
def entrypoint_http(kind: str | None, server_text: str | None, listen_port: int,
                    config_path: Path) -> None:
    """Print the reverse-proxy config forwarding /walt-vpn/ to this server."""
    from server.entrypoints import http_entrypoint_config

    if kind is None:
        raise click.UsageError("choose one of --nginx, --haproxy, --apache")
    click.echo(http_entrypoint_config(kind, _server_endpoint(server_text, config_path, None),
                                      listen_port), nl=False)


@entrypoint_group.command("ssh")
@click.option("--forwarding-host", is_flag=True,
              help="Print the script for a separate entrypoint host that only relays nodes "
                   "to the server's sshd (ProxyJump) instead of the server's own sshd setup.")
@click.option("--server-ssh", metavar="HOST[:PORT]",
              help="With --forwarding-host: the fwbuild server's sshd "
                   "(default: server.hostname:22 from --config).")
@click.option("--server-host-keys", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --forwarding-host: pinned host keys of that sshd (ssh-keyscan "
                   "output); default: keyscan at setup.")
@config_option
def entrypoint_ssh(forwarding_host: bool, server_ssh: str | None, server_host_keys: Path | None,
                   config_path: Path) -> None:
    """Print the SSH setup script: the SSH gate on this server's sshd (user walt-vpn:
    node certificates get their tunnel, read-only SFTP of their own root and their own
    EEPROM image/digest, nothing else), or a separate relaying entrypoint host."""
    from fwbuild.keys import KeyPaths
    from server.config import load_config, parse_endpoint, parse_host_keys
    from server.entrypoints import server_sshd_script, ssh_entrypoint_script

    config = load_config(config_path)
    ca_pub = KeyPaths(config.keys_dir).ssh_ca_pub.read_text("ascii")
    if not forwarding_host:
        if server_ssh or server_host_keys:
            raise click.UsageError("--server-ssh and --server-host-keys need --forwarding-host")
        if config.admin.port == 0:
            raise click.UsageError("the SSH gate needs a fixed [admin] port in the config, not 0")
        host = config.admin.listen
        admin = f"http://{f'[{host}]' if ':' in host else host}:{config.admin.port}"
        click.echo(server_sshd_script(ca_pub, admin, config.node_root,
                                      str(config.revoked_keys_file)), nl=False)
        return
    endpoint = (parse_endpoint(server_ssh, 22, "--server-ssh") if server_ssh
                else parse_endpoint(config.hostname, 22, "server.hostname"))
    keys = tuple(parse_host_keys(server_host_keys.read_text("ascii"), str(server_host_keys))
                 ) if server_host_keys else ()
    click.echo(ssh_entrypoint_script(ca_pub, endpoint, keys), nl=False)


COMMANDS = [serve, nodes_group, entrypoint_group]
