"""The two keys of a site: the RSA-2048 boot-signing key and the SSH CA key (ed25519 when
fwbuild makes it; an imported WalT CA is ECDSA P-521, and ECDSA P-256/384/521 are taken).

Private keys are written 0600 and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .eeprom.pubkey import encode_pubkey_bin, pubkey_bin_digest
from .errors import KeyFileError
from .fsutil import atomic_write

BOOT_KEY_NAME = "boot-signing.pem"
BOOT_PUB_NAME = "boot-signing.pub.pem"
SSH_CA_NAME = "ssh-ca"
SSH_CA_PUB_NAME = "ssh-ca.pub"
SshCaKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
CA_CURVES = ("secp256r1", "secp384r1", "secp521r1")


@dataclass(frozen=True)
class KeyPaths:
    directory: Path

    @property
    def boot_key(self) -> Path:
        return self.directory / BOOT_KEY_NAME

    @property
    def boot_pub(self) -> Path:
        return self.directory / BOOT_PUB_NAME

    @property
    def ssh_ca(self) -> Path:
        return self.directory / SSH_CA_NAME

    @property
    def ssh_ca_pub(self) -> Path:
        return self.directory / SSH_CA_PUB_NAME


def init_keys(directory: Path, *, force: bool = False) -> KeyPaths:
    """Create both keys in `directory`; refuse to overwrite unless `force`."""
    paths = KeyPaths(directory)
    existing = [p for p in (paths.boot_key, paths.ssh_ca) if p.exists()]
    if existing and not force:
        raise KeyFileError(
            f"{existing[0].name} already exists",
            str(existing[0]),
            "keep it, or pass --force to replace it (everything signed with it stops verifying)",
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)  # private keys: nobody else may even list them
    boot = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    atomic_write(
        paths.boot_key,
        boot.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption()),
        0o600,
    )
    atomic_write(paths.boot_pub, boot.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    ca = ed25519.Ed25519PrivateKey.generate()
    atomic_write(
        paths.ssh_ca,
        ca.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                         serialization.NoEncryption()),
        0o600,
    )
    atomic_write(paths.ssh_ca_pub, ca.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" fwbuild-ssh-ca\n")
    return paths


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} not found", str(path), "create keys with `fwbuild keys init DIR`") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what}: {exc.strerror}", str(path)) from None


def load_boot_key(path: Path) -> rsa.RSAPrivateKey:
    data = _read(path, "boot-signing key")
    check_private_mode(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError("not an unencrypted PEM private key", str(path)) from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != 2048:
        raise KeyFileError("the boot-signing key must be RSA-2048", str(path),
                           "the Pi 5 bootloader verifies RSA-2048 only")
    return key


def load_public_key(path: Path) -> rsa.RSAPublicKey:
    """An RSA public key from a public PEM, or the public half of a private PEM."""
    data = _read(path, "public key")
    try:
        if b"PRIVATE KEY" in data:
            check_private_mode(path)
            private = serialization.load_pem_private_key(data, password=None)
            key: object = private.public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError("not a PEM RSA key", str(path)) from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyFileError("not an RSA key", str(path), "the Pi 5 bootloader verifies RSA-2048 only")
    return key


def parse_ssh_ca(data: bytes, where: str) -> SshCaKey:
    """An SSH CA private key: OpenSSH format or PEM (`ssh-keygen -m PEM`), unencrypted,
    ed25519 or ECDSA P-256/384/521 (WalT's CA: `ssh-keygen -t ecdsa -b 521`)."""
    key: object
    try:
        if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError("not an unencrypted OpenSSH or PEM private key", where) from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in CA_CURVES:
        return key
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError("the SSH CA key must be ed25519 or ECDSA (P-256/384/521)", where)
    return key


def ssh_ca_public_line(ca: SshCaKey) -> bytes:
    return ca.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)


def load_ssh_ca(path: Path) -> SshCaKey:
    data = _read(path, "SSH CA key")
    check_private_mode(path)
    return parse_ssh_ca(data, str(path))


def check_private_mode(path: Path) -> None:
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"private key is readable by others (mode {mode:04o})", str(path),
                           f"chmod 600 {path}")


@dataclass(frozen=True)
class KeySummary:
    boot_key_sha256: str
    pubkey_bin_sha256: str
    ssh_ca_fingerprint: str


def describe_keys(directory: Path) -> KeySummary:
    paths = KeyPaths(directory)
    boot = load_boot_key(paths.boot_key)
    der = boot.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    ca = load_ssh_ca(paths.ssh_ca)
    blob = ca.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH).split()[1]

    fp = base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")
    return KeySummary(
        boot_key_sha256=hashlib.sha256(der).hexdigest(),
        pubkey_bin_sha256=pubkey_bin_digest(encode_pubkey_bin(boot.public_key())),
        ssh_ca_fingerprint=f"SHA256:{fp}",
    )


def recipe_keys_dir(recipe_directory: str, keys_dir: str, recipe_file: str = "the recipe",
                    cwd: Path | None = None) -> Path:
    """The absolute key directory of a recipe: `keys.dir` relative to the recipe's directory.

    Refused when ambiguous: a relative `keys.dir` that holds no keys beside the recipe while
    the same name in the current directory does (keys made by an older fwbuild, or by
    following a hint from another directory). Guessing would either sign with the wrong
    key or create a second site key.
    """
    configured = Path(keys_dir)
    if configured.is_absolute():
        return configured
    beside = (Path(recipe_directory) / configured).resolve()
    here = ((cwd or Path.cwd()) / configured).resolve()
    if beside != here and not KeyPaths(beside).boot_key.exists() and KeyPaths(here).boot_key.exists():
        raise KeyFileError(
            f"keys.dir = {keys_dir!r} is ambiguous: it means {beside} (relative to the recipe), "
            f"which holds no keys, but {here} (relative to the current directory) does",
            f"{recipe_file}: keys.dir",
            f"pass --keys {here} (or set keys.dir to that absolute path, or move the keys to {beside})")
    return beside
