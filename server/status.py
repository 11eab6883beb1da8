"""The status page: one view model (`status_model`) rendered two ways.

`/` and `/nodes/<mac>` render it through jinja2 templates (`server/templates/`, autoescaped);
`/api/status` returns the same model as JSON, which the page's small script polls to
refresh itself without a reload. Times are shown in UTC with the zone, sizes in kB/MB.
"""

from __future__ import annotations

import hashlib
import time
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2
from cryptography.hazmat.primitives import serialization

from fwbuild import __version__
from fwbuild.eeprom.pubkey import encode_pubkey_bin, pubkey_bin_digest

from . import BOOT_MODES
from .artifacts import MANIFEST, ArtifactMissing
from .db import EventRow, NodeRow, recent_events
from .macs import colon_mac
from .service import Service

TEMPLATES = Path(__file__).parent / "templates"
SITE_EVENTS = 30
NODE_EVENTS = 5
REFRESH_MS = 2000


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def when(ts: int | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def human_size(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "kB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _eeprom_state(node: NodeRow) -> tuple[str, str]:
    """(text, css class) comparing the expected EEPROM with the one the node last fetched."""
    if node.state != "enrolled":
        return "revoked: none served", "bad"
    if node.eeprom_digest is None:
        return "not rendered yet", "warn"
    if node.fetched_digest is None:
        return "never fetched: will flash", "warn"
    if node.fetched_digest != node.eeprom_digest:
        return "differs: will re-flash", "warn"
    return "up to date", "ok"


def _event(event: EventRow, names: dict[str, str]) -> dict[str, Any]:
    return {"id": event.id, "time": event.time, "time_text": when(event.time), "mac": colon_mac(event.node_mac),
            "node": names.get(event.node_mac, colon_mac(event.node_mac)),
            "artifact": event.artifact, "result": event.result, "client": event.client or ""}


def node_view(service: Service, node: NodeRow, events: int, now: int) -> dict[str, Any]:
    cert = service.current_cert(node)
    eeprom_text, eeprom_css = _eeprom_state(node)
    names = {node.mac: node.label or colon_mac(node.mac)}
    with service.db.connection() as conn:
        recent = [_event(e, names) for e in recent_events(conn, node.mac, events)]
    expires_in = cert.valid_before - now
    return {
        "id": node.mac,
        "mac": colon_mac(node.mac),
        "label": node.label or "",
        "name": node.label or colon_mac(node.mac),
        "vpn_mac": node.vpn_mac,
        "state": node.state,
        "mode": service.mode_of(node),
        "mode_source": "override" if node.boot_mode else "site default",
        "last_boot": node.last_boot, "last_boot_text": when(node.last_boot),
        "last_seen": node.last_seen, "last_seen_text": when(node.last_seen),
        "enrolled_text": when(node.enrolled_at),
        "cert_serial": cert.serial,
        "cert_expiry": cert.valid_before, "cert_expiry_text": when(cert.valid_before),
        "cert_css": "bad" if expires_in <= 0 else ("warn" if expires_in < 30 * 86400 else ""),
        "expected_eeprom": node.eeprom_digest or "",
        "fetched_eeprom": node.fetched_digest or "",
        "expected_short": (node.eeprom_digest or "-")[:16],
        "fetched_short": (node.fetched_digest or "-")[:16],
        "fetched_eeprom_text": (f"at {when(node.fetched_at)}" if node.fetched_at is not None
                                else "(never fetched)"),
        "eeprom_text": eeprom_text, "eeprom_css": eeprom_css,
        "events": recent,
    }


def _manifest_info(service: Service) -> tuple[dict[str, Any], list[str]]:
    """The manifest's build facts and the problems of the set (missing or mismatched files)."""
    artifacts = service.artifacts
    problems = list(artifacts.check(BOOT_MODES))
    manifest = artifacts.manifest()
    spki = service.boot_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    info: dict[str, Any] = {"boot_key_sha256": hashlib.sha256(spki).hexdigest(),
                            "pubkey_bin_sha256": pubkey_bin_digest(
                                encode_pubkey_bin(service.boot_key.public_key())),
                            "recipe": "", "target": "", "source_date_epoch": None,
                            "source_date_epoch_text": "", "fwbuild_version": "",
                            "server_version": __version__, "steps": []}
    if manifest is None:
        problems.append(f"{artifacts.directory / MANIFEST}: missing or not JSON "
                        "(not a build output?)")
        return info, problems
    recipe = manifest.get("recipe")
    if isinstance(recipe, dict):
        info["recipe"] = str(recipe.get("name", ""))
        info["target"] = str(recipe.get("target", ""))
    epoch = manifest.get("source_date_epoch")
    if isinstance(epoch, int):
        info["source_date_epoch"] = epoch
        info["source_date_epoch_text"] = f"{epoch} ({when(epoch)})"
    info["fwbuild_version"] = str(manifest.get("fwbuild_version", ""))
    steps = manifest.get("steps")
    info["steps"] = [str(s) for s in steps] if isinstance(steps, list) else []
    listed = manifest.get("artifacts")
    if isinstance(listed, dict):
        for rel, entry in sorted(listed.items()):
            path = PurePosixPath(str(rel))
            if path.is_absolute() or ".." in path.parts or not isinstance(entry, dict):
                problems.append(f"manifest.json: bad entry {str(rel)[:60]!r}")
                continue
            try:
                found = artifacts.info(Path(path))
            except ArtifactMissing:
                problems.append(f"{rel}: listed in manifest.json but missing")
                continue
            if found.sha256 != entry.get("sha256") or found.size != entry.get("size"):
                problems.append(f"{rel}: does not match manifest.json (sha256 or size): "
                                "the set was changed after the build")
    return info, problems


def status_model(service: Service, events: int = SITE_EVENTS) -> dict[str, Any]:
    """Everything the status page shows, as JSON-ready values."""
    now = int(time.time())
    config = service.config
    nodes = service.nodes()
    names = {n.mac: n.label or colon_mac(n.mac) for n in nodes}
    with service.db.connection() as conn:
        site_events = [_event(e, names) for e in recent_events(conn, None, events)]
    build, problems = _manifest_info(service)
    files = [{"name": name, "sha256": str(v["sha256"]), "size": v["size"],
              "size_text": human_size(int(str(v["size"]))),
              "mtime_text": when(int(str(v["mtime"])))}
             for name, v in service.artifacts.versions().items()]
    return {
        "hostname": config.hostname,
        "default_boot_mode": config.default_boot_mode,
        "http_entrypoint": config.http_entrypoint.render(80),
        "ssh_entrypoint": config.ssh_entrypoint.render(22),
        "generated": now, "generated_text": when(now),
        "nodes": [node_view(service, n, NODE_EVENTS, now) for n in nodes],
        "events": site_events,
        "artifacts": {"directory": str(config.artifacts), "files": files, "build": build},
        "problems": problems,
        "refresh_ms": REFRESH_MS,
    }


def render_status(service: Service) -> str:
    return _environment().get_template("status.html").render(m=status_model(service))


def render_node(service: Service, mac: str) -> str:
    node = service.node(mac)
    model = status_model(service, events=0)
    view = node_view(service, node, 50, int(time.time()))
    return _environment().get_template("node.html").render(m=model, n=view)
