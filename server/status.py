"""The HTML status page: nodes, modes, last boot, artifact versions. No JavaScript."""

from __future__ import annotations

import html
import time

from .macs import colon_mac
from .service import Service

_STYLE = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left}th{background:#eee}
.revoked{color:#a00}code{font-size:90%}"""


def _when(ts: int | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _row(cells: list[str], css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def render_status(service: Service) -> str:
    config = service.config
    esc = html.escape
    nodes = service.nodes()
    rows = []
    for node in nodes:
        mode = service.mode_of(node)
        mode_text = esc(mode) + ("" if node.boot_mode else " (site default)")
        rows.append(_row([
            f"<code>{esc(colon_mac(node.mac))}</code>", f"<code>{esc(node.vpn_mac)}</code>",
            esc(node.state), mode_text, esc(_when(node.last_boot)), esc(_when(node.last_seen)),
            f"<code>{esc((node.eeprom_digest or 'not rendered')[:16])}</code>",
            str(node.cert_serial),
        ], "revoked" if node.state != "enrolled" else ""))
    artifacts = [
        _row([f"<code>{esc(name)}</code>", f"<code>{esc(str(info['sha256']))}</code>",
              esc(str(info["size"])), esc(_when(int(str(info["mtime"]))))])
        for name, info in service.artifacts.versions().items()
    ]
    node_table = (
        "<table><tr><th>MAC</th><th>VPN MAC</th><th>state</th><th>boot mode</th>"
        "<th>last boot</th><th>last seen</th><th>expected EEPROM</th><th>cert serial</th></tr>"
        + "".join(rows) + "</table>") if rows else "<p>No node enrolled yet.</p>"
    artifact_table = (
        "<table><tr><th>artifact</th><th>sha256</th><th>bytes</th><th>modified</th></tr>"
        + "".join(artifacts) + "</table>") if artifacts else "<p>No artifact found.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fwbuild server: {esc(config.hostname)}</title>
<style>{_STYLE}</style></head><body>
<h1>fwbuild server <code>{esc(config.hostname)}</code></h1>
<p>Site default boot mode: <b>{esc(config.default_boot_mode)}</b>.
HTTP entrypoint <code>{esc(config.http_entrypoint.render(80))}</code>,
SSH entrypoint <code>{esc(config.ssh_entrypoint.render(22))}</code>.
{len(nodes)} node(s). Rendered {esc(_when(int(time.time())))}.</p>
<h2>Nodes</h2>
{node_table}
<h2>Artifacts</h2>
<p>From <code>{esc(str(config.artifacts))}</code>.</p>
{artifact_table}
</body></html>
"""
