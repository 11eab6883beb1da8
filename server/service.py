"""The server core: enrollment, node administration, per-node artifacts.

Shared by the HTTP handlers, the admin API and the `fwbuild nodes` CLI (which opens the
same state database directly: SQLite WAL serialises the writers of both processes, and
the RevokedKeys file is rewritten under an flock).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from fwbuild.errors import FwbuildError, UsageError
from fwbuild.keys import KeyPaths, check_private_mode, load_boot_key, load_ssh_ca

from . import BOOT_MODES
from .artifacts import ArtifactMissing, ArtifactSet
from .certs import (
    build_creds,
    issue_certificate,
    known_hosts,
    parse_node_pubkey,
    public_line,
    revoked_keys_lock,
    write_revoked_keys,
)
from .config import ServerConfig
from .db import (
    CertRow,
    NodeRow,
    changes,
    get_cert,
    get_node,
    get_node_by_label,
    insert_cert,
    list_nodes,
    next_counter,
    node_certs,
    note_change,
    open_database,
    prune_events,
    recent_events,
    revoked_public_keys,
)
from .errors import Conflict, Forbidden, NotFound
from .macs import colon_mac, normalise_mac, vpn_mac
from .nodeimg import NodeImageRenderer, NodeValues, RenderedImage, http_path, node_root

log = logging.getLogger("fwbuild.server")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
PRUNE_EVERY = 100  # events: prune by age and count every this many inserts


@dataclass(frozen=True)
class Enrollment:
    mac: str
    vpn_mac: str
    serial: int
    key_id: str
    certificate: str
    http_path: str
    boot_mode: str
    eeprom_digest: str | None  # None: the node keeps its own key, the server renders no image
    re_enrolled: bool

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Service:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        paths = KeyPaths(config.keys_dir)
        self.boot_key = load_boot_key(paths.boot_key)
        self.ca = load_ssh_ca(paths.ssh_ca)
        check_private_mode(paths.boot_key)
        check_private_mode(paths.ssh_ca)
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(config.state_dir, 0o700)  # node keys live here (database, EEPROM cache)
        self.db = open_database(config)
        self.artifacts = ArtifactSet(config.artifacts, config.state_dir, self.boot_key)
        self.renderer = NodeImageRenderer(config, self.boot_key, self.artifacts.eeprom_base,
                                          allow_synthetic=self.artifacts.is_virtual())
        removed = self.renderer.remove_stale_temp_files()
        if removed:
            log.info("removed %d stale temporary file(s) from %s", removed,
                     config.state_dir / "eeprom")
        self.known_hosts = known_hosts(config.ssh_entrypoint, config.ssh_host_keys)
        # node-conf/ssh-entrypoint-host-keys: `ssh-keyscan -H` lines, as WalT serves them
        self.hashed_known_hosts = known_hosts(config.ssh_entrypoint, config.ssh_host_keys,
                                              hashed=True)
        self.sync_revoked_keys()

    def close(self) -> None:
        self.db.close()

    def check_artifacts(self) -> None:
        """ArtifactMissing naming every problem when the artifact set cannot be served."""
        problems = self.artifacts.check(BOOT_MODES)
        if problems:
            raise ArtifactMissing("the artifact set cannot be served: " + "; ".join(problems),
                                  str(self.config.artifacts),
                                  "build it (`fwbuild build RECIPE`) or fix server.artifacts "
                                  "in the config")

    # -- reads ---------------------------------------------------------------------------
    def node(self, mac: str) -> NodeRow:
        mac12 = normalise_mac(mac)
        with self.db.connection() as conn:
            node = get_node(conn, mac12)
        if node is None:
            raise NotFound(f"unknown node {colon_mac(mac12)}", hint="enroll it first")
        return node

    def find(self, name: str) -> NodeRow:
        """A node by its MAC (any accepted form) or its label."""
        try:
            mac12 = normalise_mac(name)
        except UsageError:
            if not LABEL_RE.fullmatch(name):
                raise UsageError(f"not a MAC address or node label: {name[:40]!r}", "node",
                                 "name a node by its MAC (dc:a6:32:...) or the label set with "
                                 "`fwbuild nodes label MAC NAME`") from None
            with self.db.connection() as conn:
                node = get_node_by_label(conn, name)
            if node is None:
                raise NotFound(f"no node is labelled {name!r}", "node",
                               "`fwbuild nodes list` shows every node with its label") from None
            return node
        return self.node(mac12)

    def set_label(self, mac: str, label: str | None) -> NodeRow:
        """Name a node (None: remove its label). Labels are unique and never look like a MAC."""
        node = self.node(mac)
        if label is not None:
            if not LABEL_RE.fullmatch(label):
                raise UsageError(f"bad node label {label[:40]!r}", "label",
                                 "1-32 characters: letters, digits, '.', '_' or '-', starting "
                                 "with a letter or digit")
            try:
                normalise_mac(label)
            except UsageError:
                pass
            else:
                raise UsageError(f"label {label!r} reads as a MAC address", "label",
                                 "choose a name that is not 12 hex digits")
        with self.db.transaction() as conn:
            other = get_node_by_label(conn, label) if label is not None else None
            if other is not None and other.mac != node.mac:
                raise Conflict(f"label {label!r} already names {colon_mac(other.mac)}", "label",
                               f"remove it first: `fwbuild nodes label {colon_mac(other.mac)} "
                               "--clear`")
            conn.execute("UPDATE nodes SET label = ? WHERE mac = ?", (label, node.mac))
        return self.node(node.mac)

    def booting_node(self, mac: str) -> NodeRow:
        """The node for a per-node boot path: 404 unknown, 403 revoked."""
        node = self.node(mac)
        if node.state != "enrolled":
            raise Forbidden(f"node {colon_mac(node.mac)} is revoked")
        return node

    def mode_of(self, node: NodeRow) -> str:
        return node.boot_mode or self.config.default_boot_mode

    def current_cert(self, node: NodeRow) -> CertRow:
        with self.db.connection() as conn:
            cert = get_cert(conn, node.cert_serial)
        assert cert is not None, "nodes.cert_serial references certificates"
        return cert

    def nodes(self) -> list[NodeRow]:
        with self.db.connection() as conn:
            return list_nodes(conn)

    def creds(self, node: NodeRow) -> str:
        cert = self.current_cert(node)
        return build_creds(cert.private_key, cert.certificate, self.known_hosts)

    def node_image(self, node: NodeRow) -> RenderedImage:
        """The node's expected EEPROM image; records its digest when it changed.

        Conflict (409) for a node that enrolled with its own key (WalT's client): the
        server does not have the private key its WALT_VPN_CREDS must hold."""
        cert = self.current_cert(node)
        if cert.private_key is None:
            raise Conflict(f"node {colon_mac(node.mac)} enrolled with its own SSH key: the "
                           "server cannot render its EEPROM image (it has no private key)",
                           hint="such a node re-flashes its EEPROM through its own client "
                                "(WalT's walt-vpn-auto-enroll), from node-conf/* and public.pem")
        values = NodeValues(node.mac, node.vpn_mac, self.mode_of(node), cert.serial,
                            node.eeprom_ts, self.creds(node))
        rendered = self.renderer.render(values)
        if node.eeprom_key != rendered.key:
            with self.db.transaction() as conn:
                # Conditional: a concurrent mode change or re-enrollment wins.
                conn.execute(
                    "UPDATE nodes SET eeprom_digest = ?, eeprom_key = ? "
                    "WHERE mac = ? AND cert_serial = ? AND eeprom_ts = ?",
                    (rendered.sha256, rendered.key, node.mac, cert.serial, node.eeprom_ts))
        return rendered

    def describe(self, node: NodeRow, events: int = 0) -> dict[str, Any]:
        cert = self.current_cert(node)
        info: dict[str, Any] = {
            "mac": colon_mac(node.mac),
            "label": node.label,
            "vpn_mac": node.vpn_mac,
            "state": node.state,
            "boot_mode": self.mode_of(node),
            "boot_mode_override": node.boot_mode,
            "enrolled_at": node.enrolled_at,
            "last_seen": node.last_seen,
            "last_boot": node.last_boot,
            "eeprom_digest": node.eeprom_digest,
            "fetched_eeprom_digest": node.fetched_digest,
            "fetched_eeprom_at": node.fetched_at,
            "http_path": http_path(node.mac),
            "root": node_root(self.config, node.mac, node.vpn_mac),
            "certificate": {
                "serial": cert.serial, "key_id": cert.key_id,
                "principals": cert.principals.split(","),
                "valid_after": cert.valid_after, "valid_before": cert.valid_before,
                "revoked_at": cert.revoked_at, "server_generated_key": cert.private_key is not None,
            },
        }
        if events:
            with self.db.connection() as conn:
                info["events"] = [
                    {"time": e.time, "artifact": e.artifact, "result": e.result,
                     "client": e.client} for e in recent_events(conn, node.mac, events)]
                info["certificates"] = [
                    {"serial": c.serial, "issued_at": c.issued_at, "revoked_at": c.revoked_at}
                    for c in node_certs(conn, node.mac)]
        return info

    # -- writes --------------------------------------------------------------------------
    def enroll(self, mac: str, pubkey: str | None = None, client: str | None = None,
               now: int | None = None) -> Enrollment:
        """Create (or re-key) a node: VPN MAC, SSH key pair, certificate, EEPROM image."""
        mac12 = normalise_mac(mac, "mac")
        node_key = parse_node_pubkey(pubkey) if pubkey and pubkey.strip() else None
        key_line = public_line(node_key) if node_key is not None else None
        now = int(time.time()) if now is None else now
        with self.db.transaction() as conn:
            old = get_node(conn, mac12)
            if old is not None and old.state != "enrolled":
                raise Forbidden(f"node {colon_mac(mac12)} is revoked",
                                hint=f"an admin must run `fwbuild nodes forget {colon_mac(mac12)}` "
                                     "before it can enroll again")
            if key_line is not None and conn.execute(
                    "SELECT 1 FROM certificates WHERE public_key = ?", (key_line,)).fetchone():
                raise Conflict("this public key was already certified",
                               hint="generate a new key pair for each enrollment")
            serial = next_counter(conn, "cert_serial")
            issued = issue_certificate(self.ca, mac12, serial, now,
                                       self.config.cert_validity_days, node_key)
            insert_cert(conn, CertRow(
                serial, mac12, issued.key_id, "walt-vpn", issued.valid_after,
                issued.valid_before, " ".join(issued.public_key.split()[:2]),
                issued.certificate, issued.private_key, now, None))
            if old is None:
                vmac = vpn_mac(next_counter(conn, "vpn_mac"))
                conn.execute(
                    "INSERT INTO nodes(mac, vpn_mac, boot_mode, state, cert_serial, enrolled_at,"
                    " eeprom_ts) VALUES (?, ?, NULL, 'enrolled', ?, ?, ?)",
                    (mac12, vmac, serial, now, now))
            else:
                vmac = old.vpn_mac
                conn.execute("UPDATE certificates SET revoked_at = ? WHERE serial = ?",
                             (now, old.cert_serial))
                conn.execute(
                    "UPDATE nodes SET cert_serial = ?, enrolled_at = ?, eeprom_ts = ?,"
                    " eeprom_digest = NULL, eeprom_key = NULL WHERE mac = ?",
                    (serial, now, max(now, old.eeprom_ts + 1), mac12))
            self._event(conn, mac12, "enroll", "re-enrolled" if old else "enrolled", client, now)
            if old is not None:
                note_change(conn)  # the old certificate is revoked: every instance follows
        if old is not None:
            self.sync_revoked_keys()
        node = self.node(mac12)
        digest = self.node_image(node).sha256 if issued.private_key is not None else None
        log.info("enrolled %s as %s (certificate serial %d)", colon_mac(mac12), vmac, serial)
        return Enrollment(colon_mac(mac12), vmac, serial, issued.key_id, issued.certificate,
                          http_path(mac12), self.mode_of(node), digest, old is not None)

    def set_mode(self, mac: str, mode: str | None) -> NodeRow:
        """Override a node's boot mode (None: back to the site default); re-renders at once."""
        if mode is not None and mode not in BOOT_MODES:
            raise UsageError(f"unknown boot mode {mode!r}", "mode",
                             "use enforced, permissive or default")
        node = self.node(mac)
        if node.state != "enrolled":
            raise Conflict(f"node {colon_mac(node.mac)} is revoked: it has no boot mode", "mode",
                           f"`fwbuild nodes forget {colon_mac(node.mac)}`, then let it enroll "
                           "again")
        now = int(time.time())
        with self.db.transaction() as conn:
            conn.execute("UPDATE nodes SET boot_mode = ?, eeprom_ts = CASE WHEN eeprom_ts + 1 > ?"
                         " THEN eeprom_ts + 1 ELSE ? END, eeprom_digest = NULL, eeprom_key = NULL"
                         " WHERE mac = ?", (mode, now, now, node.mac))
            self._event(conn, node.mac, "boot-mode", mode or "default", "admin", now)
            note_change(conn)
        node = self.node(node.mac)
        if node.state == "enrolled" and self.current_cert(node).private_key is not None:
            self.node_image(node)
            node = self.node(node.mac)
        return node

    def revoke(self, mac: str) -> NodeRow:
        """Revoke the node's certificate (RevokedKeys) and refuse its boot paths (403)."""
        node = self._revoke_all(mac, "UPDATE nodes SET state = 'revoked' WHERE mac = ?",
                                "revoke", "revoked")
        log.info("revoked %s (certificate serial %d)", colon_mac(node.mac), node.cert_serial)
        return self.node(node.mac)

    def forget(self, mac: str) -> None:
        """Remove the node (its certificates stay revoked forever)."""
        self._revoke_all(mac, "DELETE FROM nodes WHERE mac = ?", "forget", "forgotten")

    def _revoke_all(self, mac: str, node_update: str, event: str, result: str) -> NodeRow:
        """Revoke every certificate of the node, apply `node_update` to its row (one
        transaction), then rewrite RevokedKeys and drop its rendered image."""
        node = self.node(mac)
        now = int(time.time())
        with self.db.transaction() as conn:
            conn.execute("UPDATE certificates SET revoked_at = coalesce(revoked_at, ?) "
                         "WHERE node_mac = ?", (now, node.mac))
            conn.execute(node_update, (node.mac,))
            self._event(conn, node.mac, event, result, "admin", now)
            note_change(conn)
        self.sync_revoked_keys()
        self.renderer.forget(node.mac)
        return node

    def record(self, node: NodeRow, artifact: str, result: str, client: str | None,
               boot: bool = False, fetched: str | None = None) -> None:
        """An event for a fetch by the bound node itself (its address or its certificate);
        updates last_seen, last_boot when `boot` (the whole boot.img was sent) and the
        last fetched EEPROM digest when `fetched` (the whole pieeprom.bin was sent)."""
        now = int(time.time())
        with self.db.transaction() as conn:
            self._event(conn, node.mac, artifact, result, client, now)
            conn.execute("UPDATE nodes SET last_seen = ?, last_boot = CASE WHEN ? THEN ? "
                         "ELSE last_boot END WHERE mac = ?", (now, boot, now, node.mac))
            if fetched is not None:
                conn.execute("UPDATE nodes SET fetched_digest = ?, fetched_at = ? WHERE mac = ?",
                             (fetched, now, node.mac))

    def _event(self, conn: Any, mac12: str, artifact: str, result: str, client: str | None,
               now: int) -> None:
        row = conn.execute("INSERT INTO events(node_mac, artifact, time, result, client) "
                           "VALUES (?, ?, ?, ?, ?) RETURNING id",
                           (mac12, artifact, now, result, client)).fetchone()
        if int(row[0]) % PRUNE_EVERY == 0:
            prune_events(conn, now - self.config.events_max_age_days * 86400,
                         self.config.events_max_count)

    def follow_changes(self, stop: threading.Event, interval: float = 1.0) -> None:
        """Until `stop`: apply what other instances (or `fwbuild nodes`) changed in the
        shared state: rewrite RevokedKeys, drop the rendered images of nodes no longer
        enrolled. Woken by NOTIFY (PostgreSQL), else every `interval` seconds."""
        with self.db.connection() as conn:
            seen = changes(conn)
        while not stop.is_set():
            try:
                self.db.wait_change(interval, stop)
                with self.db.connection() as conn:
                    now = changes(conn)
                    if now == seen:
                        continue
                    gone = {n.mac for n in list_nodes(conn) if n.state != "enrolled"}
                seen = now
                self.sync_revoked_keys()
                cached = self.renderer.cached_macs()
                for mac12 in cached & gone:
                    self.renderer.forget(mac12)
                log.info("followed a state change (change %d)", now)
            except FwbuildError as exc:
                log.warning("following state changes: %s (retrying)", exc)
                stop.wait(interval)
            except Exception:
                log.exception("following state changes failed (retrying)")
                stop.wait(interval)

    def sync_revoked_keys(self) -> None:
        """Rewrite RevokedKeys from the database (under an flock, so the newest list wins)."""
        with revoked_keys_lock(self.config.revoked_keys_file):
            with self.db.connection() as conn:
                revoked = revoked_public_keys(conn)
            write_revoked_keys(self.config.revoked_keys_file, revoked)
