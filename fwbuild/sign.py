"""`.sig` files (pi5-boot-facts §2): build, parse, verify. Pure: bytes in, bytes out.

A `.sig` file is LF-terminated lines, in this order:
  1. SHA-256 of the signed file, 64 lowercase hex digits;
  2. `ts: <unix seconds>`;
  3. optional `target-soc: <soc>`;
  4. optional `rsa2048: <512 lowercase hex>`, RSA PKCS#1 v1.5 / SHA-256 over the file bytes only.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .errors import FormatError, SignatureError

MAX_TS = 0xFFFFFFFF  # the EEPROM update timestamp is 32-bit; .sig ts lines follow suit
TIMESTAMP = "0 to 4294967295 (unix seconds)"
_SOC = re.compile(r"^[0-9a-z]+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX512 = re.compile(r"^[0-9a-f]{512}$")


@dataclass(frozen=True)
class Sig:
    sha256: str
    ts: int
    target_soc: str | None = None
    rsa2048: bytes | None = None


def source_date_epoch(default: int | None = None) -> int:
    """SOURCE_DATE_EPOCH when set, else `default`, else now."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is not None and value.strip():
        if not re.fullmatch(r"[0-9]{1,10}", value.strip()) or int(value) > MAX_TS:
            raise FormatError(
                f"SOURCE_DATE_EPOCH is not a timestamp: {value!r}",
                "environment",
                f"set it to {TIMESTAMP}, e.g. SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)",
            )
        return int(value)
    return int(time.time()) if default is None else default


def rsa_sign(data: bytes, key: rsa.RSAPrivateKey) -> bytes:
    """RSA-2048 PKCS#1 v1.5 signature with SHA-256 (deterministic)."""
    if key.key_size != 2048:
        raise SignatureError(f"the signing key is RSA-{key.key_size}", hint="the Pi 5 bootloader only accepts RSA-2048")
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def rsa_verify(data: bytes, signature: bytes, key: rsa.RSAPublicKey) -> bool:
    try:
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def build_sig(
    data: bytes,
    ts: int,
    *,
    target_soc: str | None = None,
    key: rsa.RSAPrivateKey | None = None,
) -> bytes:
    """The `.sig` file for `data`; with `key`, includes the `rsa2048:` line."""
    if not 0 <= ts <= MAX_TS:
        raise FormatError(f"timestamp {ts} out of range", "ts", f"use {TIMESTAMP}")
    if target_soc is not None and not _SOC.match(target_soc):
        raise FormatError(f"invalid target-soc {target_soc!r}", "target-soc", "e.g. 2712")
    lines = [hashlib.sha256(data).hexdigest(), f"ts: {int(ts)}"]
    if target_soc is not None:
        lines.append(f"target-soc: {target_soc}")
    if key is not None:
        lines.append(f"rsa2048: {rsa_sign(data, key).hex()}")
    return ("\n".join(lines) + "\n").encode("ascii")


def parse_sig(text: bytes, where: str = ".sig") -> Sig:
    """Parse a `.sig` file strictly: line order, lowercase hex, known keys only."""
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("signature file is not ASCII text", where) from None
    if "\r" in decoded:
        raise FormatError("signature file has CR line endings", where, "use LF line endings")
    lines = decoded.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise FormatError("signature file is empty", where)
    if not _HEX64.match(lines[0]):
        raise FormatError("first line is not a 64-digit lowercase SHA-256", f"{where}:1")
    if len(lines) < 2 or not lines[1].startswith("ts: "):
        raise FormatError("second line must be `ts: <unix seconds>`", f"{where}:2")
    if not re.fullmatch(r"0|[1-9][0-9]{0,9}", lines[1][4:]):
        raise FormatError("`ts:` is not an integer (digits, no leading zero)", f"{where}:2")
    ts = int(lines[1][4:])
    if ts > MAX_TS:
        raise FormatError(f"`ts:` {ts} out of range", f"{where}:2", f"use {TIMESTAMP}")
    target_soc: str | None = None
    rsa2048: bytes | None = None
    for number, line in enumerate(lines[2:], start=3):
        if line.startswith("target-soc: ") and target_soc is None and rsa2048 is None:
            target_soc = line[len("target-soc: "):]
            if not _SOC.match(target_soc) or target_soc.endswith("\n"):
                raise FormatError(f"invalid target-soc {target_soc[:40]!r}", f"{where}:{number}",
                                  "e.g. 2712")
        elif line.startswith("rsa2048: ") and rsa2048 is None:
            digits = line[len("rsa2048: "):]
            if not _HEX512.match(digits):
                raise FormatError("`rsa2048:` is not 512 lowercase hex digits", f"{where}:{number}")
            rsa2048 = bytes.fromhex(digits)
        else:  # blank lines included: build_sig never writes them
            raise FormatError(f"unexpected line {line[:40]!r}", f"{where}:{number}")
    if not decoded.endswith("\n"):
        raise FormatError("signature file does not end with a newline", where)
    return Sig(lines[0], ts, target_soc, rsa2048)


def verify_sig(
    data: bytes,
    sig: Sig,
    key: rsa.RSAPublicKey | None = None,
    *,
    require_rsa: bool = False,
    where: str = ".sig",
) -> None:
    """Raise SignatureError unless `sig` matches `data` (and `key`, when given)."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sig.sha256:
        raise SignatureError(f"SHA-256 mismatch: file is {actual}, signature says {sig.sha256}", where)
    if key is None:
        if require_rsa:
            raise SignatureError("no key given to check the rsa2048 signature", where)
        return
    if sig.rsa2048 is None:
        raise SignatureError("signature has no rsa2048 line", where, "sign it with a key (--key PEM)")
    if not rsa_verify(data, sig.rsa2048, key):
        raise SignatureError("rsa2048 signature does not verify with the given key", where)
