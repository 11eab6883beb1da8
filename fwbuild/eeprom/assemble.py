"""Per-node EEPROM images: assemble (config + signature + key + timestamp), verify,
inspect and diff. Pure: bytes in, bytes (or plain data) out."""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from ..errors import BootconfError, FormatError, SignatureError
from ..sign import build_sig, parse_sig, verify_sig
from .bootconf import BootconfWarning, check_bootconf, validate_bootconf
from .image import (
    IMAGE_SIZE,
    MODIFIABLE_FILES,
    EepromImage,
    parse_image,
    read_timestamp,
    replace_files,
)
from .pubkey import PUBKEY_BIN_SIZE, decode_pubkey_bin, encode_pubkey_bin, pubkey_bin_digest
from .synthetic import is_virtual

TARGET_SOC = "2712"


def _is_placeholder(content: bytes) -> bool:
    """Zero-filled (stock) or erased content: no file was ever written there."""
    return not content.strip(b"\0") or not content.strip(b"\xff")


def _config_bytes(bootconf: str) -> bytes:
    try:
        return bootconf.encode("ascii")
    except UnicodeEncodeError as exc:
        raise BootconfError("bootconf.txt is not ASCII", f"bootconf.txt byte {exc.start}") from None


def _check_cacert_hash(settings: dict[str, str], cacert: bytes | None) -> None:
    expected = settings.get("HTTP_CACERT_HASH")
    if expected is None:
        return
    if cacert is None or hashlib.sha256(cacert).hexdigest() != expected:
        raise BootconfError("HTTP_CACERT_HASH does not match the SHA-256 of cacert.der", "HTTP_CACERT_HASH",
                          "store the CA certificate with --cacert (DER) and set its SHA-256")


def assemble_eeprom(
    base: bytes,
    bootconf: str,
    *,
    boot_key: rsa.RSAPrivateKey | None,
    timestamp: int,
    cacert: bytes | None = None,
) -> bytes:
    """`base` with bootconf.txt, and with `boot_key` its bootconf.sig (sha256 + ts +
    rsa2048) and pubkey.bin, cacert.der when given, and the update timestamp."""
    image = parse_image(base)
    config = _config_bytes(bootconf)
    settings = validate_bootconf(bootconf)
    if cacert is None and "HTTP_CACERT_HASH" in settings and image.has_file("cacert.der"):
        _check_cacert_hash(settings, image.read_file("cacert.der"))
    else:
        _check_cacert_hash(settings, cacert)
    updates = {"bootconf.txt": config}
    if boot_key is not None:
        updates["bootconf.sig"] = build_sig(config, timestamp, key=boot_key)
        updates["pubkey.bin"] = encode_pubkey_bin(boot_key.public_key())
    if cacert is not None:
        updates["cacert.der"] = cacert
    return replace_files(base, updates, timestamp=timestamp, image=image)


def check_external_digest(image: EepromImage, sig_bytes: bytes, config: bytes, new_pubkey: bytes | None,
                          where: str = "bootconf.sig") -> bytes:
    """An externally made bootconf.sig (rpi-eeprom-digest, an HSM), returned byte for byte
    (the reference's `--digest` stores it as is) once its hash line matches `config` and
    its rsa2048 line, if any, verifies with the pubkey.bin the image will hold (`new_pubkey`,
    else the image's own). Raises FormatError / SignatureError."""
    sig = parse_sig(sig_bytes, where)
    try:
        verify_sig(config, sig, where=where)
    except SignatureError as exc:
        raise SignatureError("the digest's hash line does not match the config", where,
                             f"{exc.what}; make the digest from this exact config "
                             "(rpi-eeprom-digest -i CONFIG -o SIG)") from None
    if sig.rsa2048 is None:
        return sig_bytes
    raw = new_pubkey
    if raw is None and image.has_file("pubkey.bin"):
        raw = image.read_file("pubkey.bin")
    if raw is None or _is_placeholder(raw):
        raise SignatureError("the digest is RSA-signed but the image has no pubkey.bin to verify it", where,
                             "give the public key with --pubkey PEM")
    verify_sig(config, sig, decode_pubkey_bin(raw, "pubkey.bin"), require_rsa=True, where=where)
    return sig_bytes


def pieeprom_sig(image: bytes, timestamp: int) -> bytes:
    """The `pieeprom.sig` beside a recovery pieeprom.bin: hash, `ts:`, `target-soc: 2712`."""
    if len(image) != IMAGE_SIZE:
        raise FormatError(f"EEPROM image is {len(image)} bytes, not a {IMAGE_SIZE}-byte Raspberry Pi 5 (2712) image",
                          hint="pieeprom.sig with `target-soc: 2712` is built for Raspberry Pi 5 images only")
    return build_sig(image, timestamp, target_soc=TARGET_SOC)


@dataclass(frozen=True)
class EepromReport:
    """What `verify_eeprom` checked."""

    layout: str
    soc: str  # "2711" (Raspberry Pi 4) or "2712" (Raspberry Pi 5)
    virtual: bool
    timestamp: int | None
    config_sha256: str
    settings: dict[str, str] = field(default_factory=dict)
    signed: bool = False  # bootconf.sig carries an rsa2048 line that verified
    pubkey_sha256: str | None = None  # SHA-256 of pubkey.bin (the OTP key hash), None if empty
    warnings: tuple[BootconfWarning, ...] = ()  # bootconf.txt keys the bootloader ignores


def _pubkey(image: EepromImage) -> tuple[bytes | None, rsa.RSAPublicKey | None]:
    if not image.has_file("pubkey.bin"):
        return None, None
    raw = image.read_file("pubkey.bin")
    if _is_placeholder(raw):
        return None, None
    return raw, decode_pubkey_bin(raw, "pubkey.bin")


def verify_eeprom(image: bytes, key: rsa.RSAPublicKey | None = None, *, strict: bool = False) -> EepromReport:
    """Check structure, config and bootconf.sig (against pubkey.bin, and `key` when given).
    Unknown config keys are warnings in the report (errors when `strict`).

    Raises FormatError / BootconfError / SignatureError with the reason.
    """
    parsed = parse_image(image)
    config = parsed.read_file("bootconf.txt")
    try:
        text = config.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("bootconf.txt is not ASCII", "bootconf.txt") from None
    checked = check_bootconf(text, strict=strict)
    settings = checked.settings
    if "HTTP_CACERT_HASH" in settings:
        _check_cacert_hash(settings, parsed.read_file("cacert.der") if parsed.has_file("cacert.der") else None)
    raw_pub, pub = _pubkey(parsed)
    if key is not None:
        if raw_pub is None:
            raise SignatureError("pubkey.bin is empty", "pubkey.bin", "sign with `fwbuild eeprom edit --sign-key`")
        if raw_pub[:PUBKEY_BIN_SIZE] != encode_pubkey_bin(key):
            raise SignatureError(f"pubkey.bin holds another key (sha256 {pubkey_bin_digest(raw_pub)})",
                                 "pubkey.bin")
    sig_raw = parsed.read_file("bootconf.sig") if parsed.has_file("bootconf.sig") else b""
    signed = False
    if _is_placeholder(sig_raw):
        if key is not None:
            raise SignatureError("bootconf.txt is not signed (bootconf.sig is empty)", "bootconf.sig")
    else:
        sig = parse_sig(sig_raw, "bootconf.sig")
        verify_sig(config, sig, where="bootconf.sig")
        if sig.rsa2048 is not None:
            if pub is None:
                raise SignatureError("bootconf.sig is RSA-signed but pubkey.bin is empty", "pubkey.bin")
            verify_sig(config, sig, pub, require_rsa=True, where="bootconf.sig")
            signed = True
        elif key is not None:
            raise SignatureError("bootconf.sig has no rsa2048 line", "bootconf.sig")
    return EepromReport(
        layout=parsed.layout,
        soc=parsed.soc,
        virtual=is_virtual(image),
        timestamp=read_timestamp(parsed),
        config_sha256=hashlib.sha256(config).hexdigest(),
        settings=settings,
        signed=signed,
        pubkey_sha256=pubkey_bin_digest(raw_pub) if raw_pub is not None else None,
        warnings=checked.warnings,
    )


def _signature_status(parsed: EepromImage) -> str:
    if not parsed.has_file("bootconf.sig"):
        return "absent"
    sig_raw = parsed.read_file("bootconf.sig")
    if _is_placeholder(sig_raw):
        return "unsigned (empty placeholder)"
    try:
        sig = parse_sig(sig_raw, "bootconf.sig")
        config = parsed.read_file("bootconf.txt")
        verify_sig(config, sig, where="bootconf.sig")
        if sig.rsa2048 is None:
            return f"hash only, matches bootconf.txt (ts {sig.ts})"
        _, pub = _pubkey(parsed)
        if pub is None:
            return "invalid: RSA-signed but pubkey.bin is empty"
        verify_sig(config, sig, pub, require_rsa=True, where="bootconf.sig")
        return f"valid rsa2048 signature by pubkey.bin (ts {sig.ts})"
    except (FormatError, SignatureError) as exc:
        return f"invalid: {exc.what}"


def inspect_image(data: bytes) -> dict[str, Any]:
    """A JSON-able description of an image (raises FormatError only when it cannot be parsed)."""
    parsed = parse_image(data)
    sections = [{"offset": s.offset, "magic": f"{s.magic:#010x}", "kind": s.kind, "name": s.name,
                 "length": s.length} for s in parsed.sections]
    config: str | None = None
    if parsed.has_file("bootconf.txt"):
        config = parsed.read_file("bootconf.txt").decode("ascii", errors="replace")
    try:
        raw_pub, _ = _pubkey(parsed)
        pubkey = pubkey_bin_digest(raw_pub) if raw_pub is not None else "none"
    except FormatError as exc:
        pubkey = f"invalid: {exc.what}"
    try:
        timestamp = read_timestamp(parsed)
    except FormatError:
        timestamp = None
    return {
        "size": len(data),
        "soc": parsed.soc,
        "board": "Raspberry Pi 5 (2712)" if parsed.soc == "2712" else "Raspberry Pi 4 (2711)",
        "layout": parsed.layout,
        "virtual": is_virtual(data),
        "timestamp": timestamp,
        "sections": sections,
        "files": {name: {"length": len(parsed.read_file(name)), "capacity": parsed.file_capacity(name)}
                  for name in MODIFIABLE_FILES if parsed.has_file(name)},
        "config": config,
        "pubkey_sha256": pubkey,
        "bootconf_sig": _signature_status(parsed),
    }


def _section_key(section: dict[str, Any]) -> str:
    name = f" {section['name']}" if section["name"] else ""
    return f"{section['offset']:#08x} {section['kind']}{name} len {section['length']}"


def diff_images(a: bytes, b: bytes) -> list[str]:
    """Human-readable differences (config, files, sections, timestamp); empty when equal."""
    pa, pb = parse_image(a), parse_image(b)
    ia, ib = inspect_image(a), inspect_image(b)
    lines: list[str] = []
    if pa.soc != pb.soc:
        lines.append(f"board: {ia['board']} -> {ib['board']}")
    if pa.layout != pb.layout:
        lines.append(f"layout: {pa.layout} -> {pb.layout}")
    config_a, config_b = ia["config"] or "", ib["config"] or ""
    if config_a != config_b:
        lines.append("bootconf.txt:")
        lines += [f"  {line}" for line in difflib.unified_diff(
            config_a.splitlines(), config_b.splitlines(), "a/bootconf.txt", "b/bootconf.txt", lineterm="")]
    for name in MODIFIABLE_FILES[1:]:
        content_a = pa.read_file(name) if pa.has_file(name) else None
        content_b = pb.read_file(name) if pb.has_file(name) else None
        if content_a != content_b:
            lines.append(f"{name}: {_describe(content_a)} -> {_describe(content_b)}")
    for key in ("timestamp", "pubkey_sha256", "bootconf_sig"):
        if ia[key] != ib[key]:
            lines.append(f"{key}: {ia[key]} -> {ib[key]}")
    table_a = [_section_key(s) for s in ia["sections"]]
    table_b = [_section_key(s) for s in ib["sections"]]
    if table_a != table_b:
        lines.append("sections:")
        lines += [f"  {line}" for line in difflib.unified_diff(table_a, table_b, "a", "b", lineterm="", n=0)
                  if not line.startswith(("---", "+++"))]
    changed = [s for s in pa.sections if s.kind not in ("pad", "file") and s in pb.sections
               and a[s.offset:s.end] != b[s.offset:s.end]]
    lines += [f"content differs: {s.kind} {s.name} at {s.offset:#x}".replace("  ", " ") for s in changed]
    if not lines and a != b:
        lines.append("bytes differ outside the section contents (padding or reserved area)")
    return lines


def _describe(content: bytes | None) -> str:
    if content is None:
        return "absent"
    if _is_placeholder(content):
        return f"empty ({len(content)} B)"
    return f"{len(content)} B sha256 {hashlib.sha256(content).hexdigest()[:16]}"
