"""Import a WalT site (issue 12): its VPN CA, its HTTP-boot key and its VPN node table, so
deployed WalT nodes keep their EEPROM (boot.sig verifies, the certificate logs in).

Files an admin copies off the WalT server (paths of walt-python-packages):
- `/var/lib/walt/vpn-server/vpn-ca-key`: the VPN CA (ECDSA P-521, OpenSSH private key);
- `/var/lib/walt/http-boot/private.pem`: the HTTP-boot RSA-2048 key (`openssl genrsa`),
  whose public half is in every WalT-flashed EEPROM;
- the VPN node table, as CSV with a header, exported from WalT's PostgreSQL database:
  `psql walt -c "\\copy (SELECT n.mac, n.vpnmac, a.pubkeycert, a.revoked FROM vpnnodes n
  JOIN vpnauth a ON a.vpnmac = n.vpnmac) TO 'walt-vpn-nodes.csv' CSV HEADER"`.

The keys replace the site's (`[server] keys_dir`) only with `force` when they differ
(everything signed with the old ones stops verifying); identical keys are left alone, and
a node already imported with the same certificate is unchanged, so a second import
changes nothing. Each certificate must be signed by the imported CA and carry the
`walt-vpn` principal; the node keeps its private key (the server renders no EEPROM for
it, as for any node that enrolled with its own key).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import SSHCertificate, load_ssh_public_identity

from fwbuild.errors import KeyFileError, UsageError
from fwbuild.fsutil import atomic_write
from fwbuild.keys import KeyPaths, SshCaKey, parse_ssh_ca, ssh_ca_public_line

from .certs import VPN_USER, public_line
from .config import ServerConfig
from .db import CertRow, get_node, insert_cert, next_counter, open_database
from .macs import VPN_MAC_PREFIX, colon_mac, normalise_mac

CSV_COLUMNS = ("mac", "vpnmac", "pubkeycert", "revoked")
MAX_NODES = 100_000


@dataclass
class ImportReport:
    keys_replaced: list[str] = field(default_factory=list)
    keys_unchanged: list[str] = field(default_factory=list)
    nodes_added: list[str] = field(default_factory=list)
    nodes_unchanged: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, list[str]]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class WaltNode:
    mac12: str
    vpn_mac: str
    certificate: str
    cert: SSHCertificate
    revoked: bool


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what}: {exc.strerror}", str(path)) from None


def load_walt_boot_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "WalT's private.pem"), None)
    except (ValueError, TypeError):
        raise KeyFileError("not an unencrypted PEM private key", str(path),
                           "copy /var/lib/walt/http-boot/private.pem") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != 2048:
        raise KeyFileError("the HTTP-boot key must be RSA-2048", str(path))
    return key


def _truthy(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in ("t", "true", "1", "yes"):
        return True
    if value in ("f", "false", "0", "no", ""):
        return False
    raise UsageError(f"revoked must be true or false, got {text[:20]!r}", where)


def parse_node_table(text: str, ca: SshCaKey, where: str) -> list[WaltNode]:
    """The rows of WalT's exported node table; every certificate checked against `ca`."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(c.strip().lower() for c in rows[0]) != CSV_COLUMNS:
        raise UsageError(f"the header must be {','.join(CSV_COLUMNS)}", where,
                         "export it with the psql \\copy command of the README (Coming from WalT)")
    if len(rows) > MAX_NODES:
        raise UsageError(f"more than {MAX_NODES} nodes", where)
    ca_public = ssh_ca_public_line(ca).split()[:2]
    nodes: list[WaltNode] = []
    seen: set[str] = set()
    for number, row in enumerate(rows[1:], start=2):
        place = f"{where}, line {number}"
        if not row:
            continue
        if len(row) != len(CSV_COLUMNS):
            raise UsageError(f"expected {len(CSV_COLUMNS)} columns, got {len(row)}", place)
        mac12 = normalise_mac(row[0].strip(), place)
        vpn12 = normalise_mac(row[1].strip(), place)
        if int(vpn12, 16) >> 24 != VPN_MAC_PREFIX:
            raise UsageError(f"VPN MAC {colon_mac(vpn12)} is not under 52:54:00", place)
        if mac12 in seen:
            raise UsageError(f"node {colon_mac(mac12)} appears twice", place)
        seen.add(mac12)
        line = row[2].strip()
        try:
            cert = load_ssh_public_identity(line.encode("ascii"))
        except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError):
            raise UsageError("pubkeycert is not an OpenSSH certificate line", place) from None
        if not isinstance(cert, SSHCertificate):
            raise UsageError("pubkeycert is a plain key, not a certificate", place)
        signer = cert.signature_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[:2]
        if signer != ca_public:
            raise UsageError(f"the certificate of {colon_mac(mac12)} is not signed by this CA",
                             place, "import the CA key of the WalT server these nodes enrolled with")
        try:
            cert.verify_cert_signature()
        except InvalidSignature:
            raise UsageError(f"the certificate of {colon_mac(mac12)} has a bad signature",
                             place) from None
        if VPN_USER.encode() not in cert.valid_principals:
            raise UsageError(f"the certificate of {colon_mac(mac12)} lacks the {VPN_USER} "
                             "principal", place)
        nodes.append(WaltNode(mac12, colon_mac(vpn12), " ".join(line.split()[:2]), cert,
                              _truthy(row[3], place)))
    return nodes


def _install_keys(paths: KeyPaths, ca: SshCaKey, ca_data: bytes, boot: rsa.RSAPrivateKey,
                  force: bool, report: ImportReport) -> None:
    ca_line = ssh_ca_public_line(ca)
    boot_pem = boot.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    boot_pub = boot.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    current_ca = paths.ssh_ca_pub.read_bytes().split()[:2] if paths.ssh_ca_pub.exists() else None
    current_boot = paths.boot_pub.read_bytes() if paths.boot_pub.exists() else None
    changes = []
    if current_ca != ca_line.split()[:2]:
        changes.append(("SSH CA", current_ca is not None))
    if current_boot != boot_pub:
        changes.append(("boot-signing key", current_boot is not None))
    existing = [name for name, present in changes if present]
    if existing and not force:
        raise KeyFileError(f"the site's {' and '.join(existing)} differ from WalT's",
                           str(paths.directory),
                           "pass --force to replace them (artifacts signed with the old "
                           "boot-signing key must be signed again: `fwbuild build`)")
    paths.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = [name for name, _ in changes]
    if "SSH CA" in names:
        atomic_write(paths.ssh_ca, ca_data, 0o600)
        atomic_write(paths.ssh_ca_pub, ca_line + b" walt-vpn-ca\n")
        report.keys_replaced.append(str(paths.ssh_ca))
    else:
        report.keys_unchanged.append(str(paths.ssh_ca))
    if "boot-signing key" in names:
        atomic_write(paths.boot_key, boot_pem, 0o600)
        atomic_write(paths.boot_pub, boot_pub)
        report.keys_replaced.append(str(paths.boot_key))
    else:
        report.keys_unchanged.append(str(paths.boot_key))


def import_walt_site(config: ServerConfig, ca_file: Path, boot_key_file: Path,
                     nodes_file: Path | None, force: bool = False,
                     now: int | None = None) -> ImportReport:
    """Install WalT's keys in the site's key directory and its nodes in the state database.
    Everything is checked before anything is written."""
    ca_data = _read(ca_file, "WalT's VPN CA key")
    ca = parse_ssh_ca(ca_data, str(ca_file))
    boot = load_walt_boot_key(boot_key_file)
    nodes: list[WaltNode] = []
    if nodes_file is not None:
        try:
            text = _read(nodes_file, "the node table").decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("the node table is not UTF-8", str(nodes_file)) from None
        nodes = parse_node_table(text, ca, str(nodes_file))
    report = ImportReport()
    now = int(time.time()) if now is None else now
    # Nodes first (a conflict there must not leave the keys half replaced).
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    database = open_database(config)
    try:
        with database.transaction() as conn:
            for node in nodes:
                _import_node(conn, node, now, report)
            # New enrollments must not reuse an imported VPN MAC.
            top = max((int(n.vpn_mac.replace(":", ""), 16) & 0xFFFFFF for n in nodes), default=0)
            conn.execute("INSERT INTO counters(name, value) VALUES ('vpn_mac', ?) "
                         "ON CONFLICT(name) DO UPDATE SET value = CASE WHEN excluded.value > "
                         "counters.value THEN excluded.value ELSE counters.value END", (top,))
            _install_keys(KeyPaths(config.keys_dir), ca, ca_data, boot, force, report)
    finally:
        database.close()
    return report


def _import_node(conn: object, node: WaltNode, now: int, report: ImportReport) -> None:
    import sqlite3

    assert isinstance(conn, sqlite3.Connection)
    cert = node.cert
    key_line = public_line(cert.public_key())
    old = get_node(conn, node.mac12)
    if old is not None:
        row = conn.execute("SELECT certificate FROM certificates WHERE serial = ?",
                           (old.cert_serial,)).fetchone()
        if row is not None and " ".join(str(row[0]).split()[:2]) == node.certificate \
                and old.vpn_mac == node.vpn_mac:
            report.nodes_unchanged.append(colon_mac(node.mac12))
            return
        raise UsageError(f"node {colon_mac(node.mac12)} is already known with another "
                         "certificate or VPN MAC", "nodes",
                         f"`fwbuild nodes forget {colon_mac(node.mac12)}` first to replace it")
    clash = conn.execute("SELECT mac FROM nodes WHERE vpn_mac = ?", (node.vpn_mac,)).fetchone()
    if clash is not None:
        raise UsageError(f"VPN MAC {node.vpn_mac} of {colon_mac(node.mac12)} is already used by "
                         f"{colon_mac(str(clash[0]))}", "nodes")
    serial = next_counter(conn, "cert_serial")
    key_id = cert.key_id.decode("ascii", "replace")
    revoked_at = now if node.revoked else None
    insert_cert(conn, CertRow(
        serial, node.mac12, key_id,
        ",".join(p.decode("ascii", "replace") for p in cert.valid_principals),
        cert.valid_after, min(cert.valid_before, 2**63 - 1), key_line,
        node.certificate + f" {key_id}", None, now, revoked_at))
    conn.execute(
        "INSERT INTO nodes(mac, vpn_mac, boot_mode, state, cert_serial, enrolled_at, eeprom_ts)"
        " VALUES (?, ?, NULL, ?, ?, ?, ?)",
        (node.mac12, node.vpn_mac, "revoked" if node.revoked else "enrolled", serial, now, now))
    conn.execute("INSERT INTO events(node_mac, artifact, time, result, client) "
                 "VALUES (?, 'enroll', ?, 'imported from WalT', 'admin')", (node.mac12, now))
    report.nodes_added.append(colon_mac(node.mac12))
