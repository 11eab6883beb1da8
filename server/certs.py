"""SSH credentials of a node: key pair, user certificate, WALT_VPN_CREDS, RevokedKeys.

Certificates are built with `cryptography` (no ssh-keygen): a user certificate for
principal `walt-vpn`, key id `vpn_<mac12>`, a serial from the database counter and a
validity window. The CA private key never leaves this process and is never logged.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization.ssh import (
    SSHCertificate,
    SSHCertificateBuilder,
    SSHCertificateType,
    SSHCertPublicKeyTypes,
    load_ssh_public_identity,
)

from fwbuild.errors import UsageError
from fwbuild.fsutil import atomic_write
from fwbuild.keys import SshCaKey
from fwbuild.nodecreds import (
    CERTIFICATE,
    KNOWN_HOSTS,
    PRIVATE_KEY,
    pack_credential_files,
    unpack_credential_files,
)

from .config import Endpoint, HostKey

VPN_USER = "walt-vpn"
CLOCK_SKEW = 300  # certificates are valid from 5 minutes before issue (node clocks drift)
MAX_PUBKEY_CHARS = 8192
CERT_EXTENSIONS = (b"permit-port-forwarding", b"permit-pty")


@dataclass(frozen=True)
class IssuedCert:
    certificate: str  # `<type>-cert-v01@openssh.com AAAA... vpn_<mac>` (one line)
    public_key: str   # `<type> AAAA... vpn_<mac>`
    private_key: str | None  # OpenSSH PEM when the server generated the pair
    key_id: str
    serial: int
    valid_after: int
    valid_before: int


def key_id_for(mac12: str) -> str:
    return f"vpn_{mac12}"


def parse_node_pubkey(text: str, where: str = "ssh-pubkey") -> SSHCertPublicKeyTypes:
    """A node-supplied OpenSSH public key (ed25519, ECDSA, RSA >= 2048); certificates refused."""
    if len(text) > MAX_PUBKEY_CHARS or not text.isascii() or "\x00" in text:
        raise UsageError("public key too long or not ASCII", where)
    fields = text.strip().split()
    if len(fields) < 2 or "-cert-" in fields[0]:
        raise UsageError("not an OpenSSH public key line", where,
                         "send the content of id_ed25519.pub (`ssh-ed25519 AAAA...`)")
    try:
        key = serialization.load_ssh_public_key(f"{fields[0]} {fields[1]}".encode())
    except (ValueError, UnsupportedAlgorithm):
        raise UsageError("malformed or unsupported SSH public key", where,
                         "use ssh-ed25519, ecdsa-sha2-nistp256/384/521 or ssh-rsa (>= 2048 bits)"
                         ) from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise UsageError(f"RSA key of {key.key_size} bits is too weak", where, "use >= 2048 bits")
    if not isinstance(key, (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey,
                            rsa.RSAPublicKey)):
        raise UsageError("unsupported SSH public key type", where, "use ssh-ed25519")
    return key


def public_line(key: SSHCertPublicKeyTypes) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode("ascii")


def issue_certificate(
    ca: SshCaKey,
    mac12: str,
    serial: int,
    now: int,
    validity_days: int,
    node_key: SSHCertPublicKeyTypes | None = None,
) -> IssuedCert:
    """A user certificate for the node; with no `node_key`, a new ed25519 pair is made."""
    private_pem: str | None = None
    if node_key is None:
        private = ed25519.Ed25519PrivateKey.generate()
        private_pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()).decode("ascii")
        node_key = private.public_key()
    key_id = key_id_for(mac12)
    valid_after = max(0, now - CLOCK_SKEW)
    valid_before = now + validity_days * 86400
    builder = (
        SSHCertificateBuilder()
        .public_key(node_key)
        .serial(serial)
        .type(SSHCertificateType.USER)
        .key_id(key_id.encode())
        .valid_principals([VPN_USER.encode()])
        .valid_after(valid_after)
        .valid_before(valid_before)
    )
    for name in CERT_EXTENSIONS:
        builder = builder.add_extension(name, b"")
    cert = builder.sign(ca)
    return IssuedCert(
        certificate=f"{cert.public_bytes().decode('ascii')} {key_id}",
        public_key=f"{public_line(node_key)} {key_id}",
        private_key=private_pem,
        key_id=key_id,
        serial=serial,
        valid_after=valid_after,
        valid_before=valid_before,
    )


def load_certificate(line: str) -> SSHCertificate:
    identity = load_ssh_public_identity(line.encode())
    if not isinstance(identity, SSHCertificate):
        raise UsageError("not an SSH certificate", "certificate")
    return identity


def known_hosts(entrypoint: Endpoint, keys: Sequence[HostKey], hashed: bool = False) -> str:
    """known_hosts lines for the SSH entrypoint (`[host]:port` form unless port 22);
    `hashed`: the host hashed as `ssh-keyscan -H` writes it (`|1|salt|HMAC-SHA1`)."""
    host = entrypoint.host if entrypoint.port == 22 else f"[{entrypoint.host}]:{entrypoint.port}"
    lines = []
    for key in keys:
        name = host
        if hashed:
            salt = os.urandom(20)
            digest = hmac.new(salt, host.encode("ascii"), hashlib.sha1).digest()
            name = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
        lines.append(f"{name} {key.line()}\n")
    return "".join(lines)


def build_creds(private_key: str | None, certificate: str, known_hosts_text: str) -> str:
    """WALT_VPN_CREDS for a node (`id_ed25519` left out when the node keeps its own key)."""
    files = {CERTIFICATE: (certificate + "\n").encode("ascii"), KNOWN_HOSTS: known_hosts_text.encode("ascii")}
    if private_key is not None:
        files[PRIVATE_KEY] = private_key.encode("ascii")
    return pack_credential_files(files)


def read_creds(creds: str) -> dict[str, bytes]:
    """The files inside a WALT_VPN_CREDS value (tests, `nodes show`)."""
    return unpack_credential_files(creds)


def write_revoked_keys(path: Path, revoked: Iterable[tuple[int, str, str]]) -> None:
    """The RevokedKeys file sshd reads: one plain public key per line, written atomically.

    The caller passes what the database says *while holding* `revoked_keys_lock`, so a
    slower writer can never replace a newer list with an older one.
    """
    lines = ["# fwbuild server: revoked node keys (sshd RevokedKeys); do not edit\n"]
    seen: set[str] = set()
    for serial, key_id, public_key in revoked:
        fields = public_key.split()
        key = f"{fields[0]} {fields[1]}"
        if key not in seen:
            seen.add(key)
            lines.append(f"{key} {key_id}-serial-{serial}\n")
    atomic_write(path, "".join(lines).encode("ascii"), 0o644)


class revoked_keys_lock:
    """An exclusive flock shared by server threads and `fwbuild nodes` processes."""

    def __init__(self, path: Path) -> None:
        self._path = path.with_name(path.name + ".lock")
        self._fd = -1

    def __enter__(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
