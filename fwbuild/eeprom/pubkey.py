"""`pubkey.bin` (pi5-boot-facts §2): RSA-2048 N (256 B little-endian) then E (8 B little-endian)."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric import rsa

from ..errors import FormatError

PUBKEY_BIN_SIZE = 264
_MODULUS_BYTES = 256
_EXPONENT_BYTES = 8


def encode_pubkey_bin(key: rsa.RSAPublicKey) -> bytes:
    numbers = key.public_numbers()
    if key.key_size != 2048:
        raise FormatError(f"pubkey.bin holds RSA-2048 keys only, not RSA-{key.key_size}")
    return numbers.n.to_bytes(_MODULUS_BYTES, "little") + numbers.e.to_bytes(_EXPONENT_BYTES, "little")


def decode_pubkey_bin(data: bytes, where: str = "pubkey.bin") -> rsa.RSAPublicKey:
    if len(data) < PUBKEY_BIN_SIZE:
        raise FormatError(f"pubkey.bin is {len(data)} bytes, expected {PUBKEY_BIN_SIZE}", where)
    n = int.from_bytes(data[:_MODULUS_BYTES], "little")
    e = int.from_bytes(data[_MODULUS_BYTES:PUBKEY_BIN_SIZE], "little")
    if n == 0:
        raise FormatError("pubkey.bin is an empty (zero-filled) placeholder", where,
                          "set a key with `fwbuild eeprom edit --pubkey PEM`")
    if n.bit_length() != 2048 or e < 3 or e % 2 == 0:
        raise FormatError("pubkey.bin does not hold a valid RSA-2048 public key", where)
    return rsa.RSAPublicNumbers(e, n).public_key()


def pubkey_bin_digest(data: bytes) -> str:
    """SHA-256 over the 264 bytes: the value the OTP customer key hash holds."""
    return hashlib.sha256(data[:PUBKEY_BIN_SIZE]).hexdigest()
