"""Per-node images: assemble, signatures (checked with openssl), verify, inspect, diff."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fwbuild.eeprom.assemble import (
    assemble_eeprom,
    diff_images,
    inspect_image,
    pieeprom_sig,
    verify_eeprom,
)
from fwbuild.eeprom.bootconf import render_bootconf
from fwbuild.eeprom.image import parse_image, read_timestamp, replace_file
from fwbuild.eeprom.pubkey import decode_pubkey_bin, encode_pubkey_bin
from fwbuild.eeprom.synthetic import synthetic_image
from fwbuild.errors import BootconfError, FormatError, SignatureError
from fwbuild.keys import load_boot_key
from fwbuild.sign import parse_sig

TS = 1_760_000_000
AB = synthetic_image("ab")
NON_AB = synthetic_image("non-ab")
CONFIG = render_bootconf("enforced", {
    "http_host": "boot.example.org", "http_port": 8080, "http_path": "walt-vpn/node/dca632aabbcc",
    "extra": [("WALT_VPN_MAC", "52:54:00:aa:bb:cc"), ("WALT_VPN_BOOT_MODE", "enforced")]})


@pytest.fixture(scope="module")
def boot_key(session_keys: Path) -> rsa.RSAPrivateKey:
    return load_boot_key(session_keys / "boot-signing.pem")


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize("base", [AB, NON_AB], ids=["ab", "non-ab"])
def test_assemble_writes_config_sig_key_and_timestamp(base: bytes, boot_key: rsa.RSAPrivateKey) -> None:
    image = assemble_eeprom(base, CONFIG, boot_key=boot_key, timestamp=TS)
    parsed = parse_image(image)
    assert parsed.read_file("bootconf.txt") == CONFIG.encode()
    pub = parsed.read_file("pubkey.bin")
    assert len(pub) == 264 and pub == encode_pubkey_bin(boot_key.public_key())
    if parsed.layout == "ab":
        assert parsed.find_file("pubkey.bin").length == 264 + 16
    sig = parse_sig(parsed.read_file("bootconf.sig"))
    assert sig.sha256 == hashlib.sha256(CONFIG.encode()).hexdigest()
    assert sig.ts == TS and sig.target_soc is None and sig.rsa2048 is not None
    assert read_timestamp(image) == TS
    report = verify_eeprom(image, boot_key.public_key())
    assert report.signed and report.timestamp == TS and report.virtual
    assert report.settings["BOOT_ORDER"] == "0xf7"
    # Reproducible and idempotent.
    assert assemble_eeprom(base, CONFIG, boot_key=boot_key, timestamp=TS) == image
    assert assemble_eeprom(image, CONFIG, boot_key=boot_key, timestamp=TS) == image


def test_bootconf_sig_verifies_with_openssl(tmp_path: Path, boot_key: rsa.RSAPrivateKey) -> None:
    image = parse_image(assemble_eeprom(AB, CONFIG, boot_key=boot_key, timestamp=TS))
    public = decode_pubkey_bin(image.read_file("pubkey.bin"))
    (tmp_path / "pub.pem").write_bytes(public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "bootconf.txt").write_bytes(image.read_file("bootconf.txt"))
    sig = parse_sig(image.read_file("bootconf.sig"))
    assert sig.rsa2048 is not None
    (tmp_path / "sig.bin").write_bytes(sig.rsa2048)
    result = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.bin", "bootconf.txt"],
        cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "Verified OK" in result.stdout
    (tmp_path / "bootconf.txt").write_bytes(image.read_file("bootconf.txt") + b"X=1\n")
    tampered = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.bin", "bootconf.txt"],
        cwd=tmp_path, capture_output=True, text=True, check=False)
    assert tampered.returncode != 0


def test_unsigned_assembly_and_cacert() -> None:
    cacert = b"\x30\x82" + bytes(1000)
    image = assemble_eeprom(AB, "[all]\nBOOT_ORDER=0xf7\nHTTP_CACERT_HASH="
                            + hashlib.sha256(cacert).hexdigest() + "\n",
                            boot_key=None, timestamp=TS, cacert=cacert)
    parsed = parse_image(image)
    assert parsed.read_file("cacert.der") == cacert
    assert parsed.read_file("pubkey.bin") == bytes(512)
    report = verify_eeprom(image)
    assert not report.signed and report.pubkey_sha256 is None
    with pytest.raises(BootconfError, match="HTTP_CACERT_HASH"):
        assemble_eeprom(AB, "[all]\nHTTP_CACERT_HASH=" + "0" * 64 + "\n", boot_key=None,
                        timestamp=TS, cacert=cacert)
    with pytest.raises(BootconfError, match="2284 bytes, 4 over"):
        assemble_eeprom(AB, CONFIG, boot_key=None, timestamp=TS, cacert=bytes(2284))


def test_assemble_rejects_bad_config_before_writing() -> None:
    with pytest.raises(BootconfError, match="HTTP_HOST"):
        assemble_eeprom(AB, "[all]\nHTTP_HOST=Bad\n", boot_key=None, timestamp=TS)
    with pytest.raises(BootconfError, match="ASCII"):
        assemble_eeprom(AB, "[all]\nX=\u00e9\n", boot_key=None, timestamp=TS)


def test_verify_failures(boot_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey) -> None:
    signed = assemble_eeprom(AB, CONFIG, boot_key=boot_key, timestamp=TS)
    with pytest.raises(SignatureError, match="another key"):
        verify_eeprom(signed, other_key.public_key())
    with pytest.raises(SignatureError, match="empty"):
        verify_eeprom(AB, boot_key.public_key())
    # Config changed behind the signature's back.
    tampered = replace_file(signed, "bootconf.txt", CONFIG.encode() + b"BOOT_UART=1\n")
    with pytest.raises((SignatureError, BootconfError)):
        verify_eeprom(tampered)
    tampered = replace_file(signed, "bootconf.txt", CONFIG.encode().replace(b"0xf7", b"0xf1"))
    with pytest.raises(SignatureError, match="SHA-256 mismatch"):
        verify_eeprom(tampered)
    # Signature from another key, pubkey.bin of ours.
    forged = assemble_eeprom(AB, CONFIG, boot_key=other_key, timestamp=TS)
    forged = replace_file(forged, "pubkey.bin", encode_pubkey_bin(boot_key.public_key()))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_eeprom(forged)
    with pytest.raises(FormatError):
        verify_eeprom(AB[:-1])


def test_pieeprom_sig(boot_key: rsa.RSAPrivateKey) -> None:
    image = assemble_eeprom(AB, CONFIG, boot_key=boot_key, timestamp=TS)
    sig = pieeprom_sig(image, TS)
    assert sig == (hashlib.sha256(image).hexdigest() + f"\nts: {TS}\ntarget-soc: 2712\n").encode()
    with pytest.raises(FormatError):
        pieeprom_sig(image[:100], TS)


def test_inspect(boot_key: rsa.RSAPrivateKey) -> None:
    info = inspect_image(AB)
    json.dumps(info)
    assert info["layout"] == "ab" and info["virtual"] is True and info["timestamp"] is None
    assert info["pubkey_sha256"] == "none"
    assert info["bootconf_sig"].startswith("unsigned")
    assert info["files"]["cacert.der"] == {"length": 2048, "capacity": 2280}
    assert info["sections"][0] == {"offset": 0, "magic": "0x55aaf00f", "kind": "bootcode", "name": "",
                                   "length": 25984}
    signed = inspect_image(assemble_eeprom(NON_AB, CONFIG, boot_key=boot_key, timestamp=TS))
    assert signed["layout"] == "non-ab" and signed["timestamp"] == TS
    assert signed["bootconf_sig"].startswith("valid rsa2048")
    assert signed["pubkey_sha256"] == hashlib.sha256(encode_pubkey_bin(boot_key.public_key())).hexdigest()
    assert signed["config"] == CONFIG
    broken = replace_file(assemble_eeprom(AB, CONFIG, boot_key=boot_key, timestamp=TS),
                          "bootconf.sig", b"garbage\n")
    assert inspect_image(broken)["bootconf_sig"].startswith("invalid")


def test_diff(boot_key: rsa.RSAPrivateKey) -> None:
    assert diff_images(AB, AB) == []
    signed = assemble_eeprom(AB, CONFIG, boot_key=boot_key, timestamp=TS)
    lines = diff_images(AB, signed)
    text = "\n".join(lines)
    assert "-BOOT_ORDER=0xf461" in text and "+BOOT_ORDER=0xf7" in text
    assert "pubkey.bin: empty (512 B) -> 264 B" in text
    assert "timestamp: None -> 1760000000" in text
    assert "sections:" in text
    layouts = "\n".join(diff_images(AB, NON_AB))
    assert "layout: ab -> non-ab" in layouts
