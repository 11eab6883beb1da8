"""`fwbuild import-walt`: take over a WalT site (its VPN CA, HTTP-boot key and VPN nodes)."""

from __future__ import annotations

from pathlib import Path

import click

from fwbuild.cli._common import emit_json, json_option, note

from .serve import config_option

_FILE = click.Path(dir_okay=False, exists=False, path_type=Path)


@click.command("import-walt")
@click.option("--ca", "ca_file", type=_FILE, required=True,
              help="WalT's VPN CA key (/var/lib/walt/vpn-server/vpn-ca-key).")
@click.option("--http-boot-key", "boot_key_file", type=_FILE, required=True,
              help="WalT's HTTP-boot key (/var/lib/walt/http-boot/private.pem).")
@click.option("--nodes", "nodes_file", type=_FILE,
              help="WalT's VPN node table as CSV (mac,vpnmac,pubkeycert,revoked): see the "
                   "README, 'Coming from WalT'.")
@click.option("--force", is_flag=True,
              help="Replace the site's keys when they differ from WalT's.")
@config_option
@json_option
def import_walt(ca_file: Path, boot_key_file: Path, nodes_file: Path | None, force: bool,
                config_path: Path, as_json: bool) -> None:
    """Import a WalT site: its VPN CA and HTTP-boot key become the site's keys (deployed
    certificates and EEPROMs stay valid) and its VPN nodes join the state database.

    Everything is checked first; a second import of the same files changes nothing."""
    from server.config import load_config
    from server.service import Service
    from server.walt_import import import_walt_site

    config = load_config(config_path)
    report = import_walt_site(config, ca_file, boot_key_file, nodes_file, force=force)
    service = Service(config)  # checks the installed keys, rewrites RevokedKeys
    service.close()
    if as_json:
        emit_json(report.as_json())
        return
    for path in report.keys_replaced:
        click.echo(f"key installed: {path}")
    for path in report.keys_unchanged:
        note(f"key unchanged: {path}")
    for mac in report.nodes_added:
        click.echo(f"node imported: {mac}")
    click.echo(f"{len(report.nodes_added)} node(s) imported, {len(report.nodes_unchanged)} "
               f"unchanged, {len(report.keys_replaced)} key(s) replaced")


COMMANDS = [import_walt]
