"""`.sig` files and site keys, checked against stock OpenSSL and OpenSSH."""

from __future__ import annotations

import hashlib
import re
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from fwbuild.cli import main
from fwbuild.errors import FormatError, SignatureError
from fwbuild.keys import KeyPaths, load_boot_key
from fwbuild.sign import build_sig, parse_sig, verify_sig


def _openssl_verify(data: Path, raw_sig: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature", str(raw_sig),
                           str(data)], capture_output=True, text=True, check=False)


def test_sig_create_verifies_with_stock_openssl(tmp_path: Path, session_keys: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    payload = tmp_path / "boot.img"
    payload.write_bytes(b"\x00fat image\xff" * 1000)
    runner = CliRunner()
    result = runner.invoke(main, ["sig", "create", str(payload), "--key", str(KeyPaths(session_keys).boot_key),
                                  "--target-soc", "2712", "--out", str(tmp_path / "boot.sig")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "boot.sig").read_text()
    lines = text.split("\n")
    assert lines[0] == hashlib.sha256(payload.read_bytes()).hexdigest()
    assert lines[1] == "ts: 1767225600"
    assert lines[2] == "target-soc: 2712"
    assert re.fullmatch(r"rsa2048: [0-9a-f]{512}", lines[3])
    assert text.endswith("\n") and lines[4] == ""
    raw = tmp_path / "raw.sig"
    raw.write_bytes(bytes.fromhex(lines[3].split(": ")[1]))
    pub = KeyPaths(session_keys).boot_pub
    ok = _openssl_verify(payload, raw, pub)
    assert ok.returncode == 0 and "Verified OK" in ok.stdout
    tampered = tmp_path / "tampered.img"
    blob = bytearray(payload.read_bytes())
    blob[500] ^= 0x01
    tampered.write_bytes(bytes(blob))
    assert _openssl_verify(tampered, raw, pub).returncode != 0
    # And our own verify agrees, both ways.
    assert runner.invoke(main, ["sig", "verify", str(payload), str(tmp_path / "boot.sig"),
                                "--key", str(pub)]).exit_code == 0
    bad = runner.invoke(main, ["sig", "verify", str(tampered), str(tmp_path / "boot.sig"), "--key", str(pub)])
    assert bad.exit_code == 1 and bad.output.startswith("Error: SHA-256 mismatch")


def test_sig_without_key_is_hash_and_ts_only(tmp_path: Path) -> None:
    sig = build_sig(b"abc", 42, target_soc="2712")
    assert sig == (hashlib.sha256(b"abc").hexdigest() + "\nts: 42\ntarget-soc: 2712\n").encode()


def test_rsa_line_mismatch_with_other_key(session_keys: Path, tmp_path: Path) -> None:
    from fwbuild.keys import init_keys

    other = init_keys(tmp_path / "other")
    sig = parse_sig(build_sig(b"data", 1, key=load_boot_key(KeyPaths(session_keys).boot_key)))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_sig(b"data", sig, load_boot_key(other.boot_key).public_key())
    with pytest.raises(SignatureError, match="no rsa2048 line"):
        verify_sig(b"data", parse_sig(build_sig(b"data", 1)), load_boot_key(other.boot_key).public_key())


@pytest.mark.parametrize("text,problem", [
    (b"", "empty"),
    (b"ABCDEF\nts: 1\n", "64-digit"),
    (hashlib.sha256(b"").hexdigest().upper().encode() + b"\nts: 1\n", "64-digit"),
    (hashlib.sha256(b"").hexdigest().encode() + b"\nts: soon\n", "not an integer"),
    (hashlib.sha256(b"").hexdigest().encode() + b"\n", "second line"),
    (hashlib.sha256(b"").hexdigest().encode() + b"\nts: 1\nrsa2048: abcd\n", "512 lowercase"),
    (hashlib.sha256(b"").hexdigest().encode() + b"\nts: 1\nweird: 1\n", "unexpected line"),
    (b"\xff\xfe", "not ASCII"),
])
def test_malformed_sig_files(text: bytes, problem: str) -> None:
    with pytest.raises(FormatError, match=problem):
        parse_sig(text)


@given(st.binary(max_size=512), st.integers(min_value=0, max_value=0xFFFFFFFF), st.sampled_from([None, "2712"]))
def test_sig_round_trip(data: bytes, ts: int, soc: str | None) -> None:
    sig = parse_sig(build_sig(data, ts, target_soc=soc))
    assert (sig.ts, sig.target_soc, sig.rsa2048) == (ts, soc, None)
    verify_sig(data, sig)


def test_keys_init_modes_and_refusal(tmp_path: Path) -> None:
    runner = CliRunner()
    keys = tmp_path / "keys"
    assert runner.invoke(main, ["keys", "init", str(keys)]).exit_code == 0
    paths = KeyPaths(keys)
    for secret in (paths.boot_key, paths.ssh_ca):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    before = paths.boot_key.read_bytes()
    again = runner.invoke(main, ["keys", "init", str(keys)])
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output
    assert paths.boot_key.read_bytes() == before
    assert runner.invoke(main, ["keys", "init", str(keys), "--force"]).exit_code == 0
    assert paths.boot_key.read_bytes() != before


def test_keys_show_matches_openssh_fingerprint(session_keys: Path) -> None:
    result = CliRunner().invoke(main, ["keys", "show", str(session_keys)])
    assert result.exit_code == 0, result.output
    keygen = subprocess.run(["ssh-keygen", "-l", "-f", str(KeyPaths(session_keys).ssh_ca_pub)],
                            capture_output=True, text=True, check=True).stdout.split()[1]
    assert keygen in result.output
    assert "pubkey.bin" in result.output
    secret = KeyPaths(session_keys).boot_key.read_text()
    assert secret.splitlines()[1] not in result.output  # nothing of the private key is printed


def test_ssh_ca_is_readable_by_openssh(session_keys: Path) -> None:
    out = subprocess.run(["ssh-keygen", "-y", "-f", str(KeyPaths(session_keys).ssh_ca)],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("ssh-ed25519 ")


def test_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    from fwbuild.keys import init_keys

    keys = init_keys(tmp_path / "keys")
    keys.boot_key.chmod(0o644)
    (tmp_path / "f").write_bytes(b"x")
    result = CliRunner().invoke(main, ["sig", "create", str(tmp_path / "f"), "--key", str(keys.boot_key)])
    assert result.exit_code == 1
    assert "readable by others" in result.output and "chmod 600" in result.output


@pytest.mark.parametrize("args,problem", [
    (["--timestamp", "-1"], "Invalid value"),
    (["--timestamp", "4294967296"], "Invalid value"),
    (["--target-soc", "2712\nrsa2048: 00"], "invalid target-soc"),
])
def test_sig_create_rejects_bad_fields(tmp_path: Path, args: list[str], problem: str) -> None:
    (tmp_path / "f").write_bytes(b"x")
    result = CliRunner().invoke(main, ["sig", "create", str(tmp_path / "f"), "--out", "-", *args])
    assert result.exit_code != 0 and problem in result.output
    assert "rsa2048: 00" not in result.output.split("Error")[0]


def test_source_date_epoch_must_be_a_timestamp(monkeypatch: pytest.MonkeyPatch) -> None:
    from fwbuild.sign import source_date_epoch

    for bad in ("-7", "+1_0", "1e9", "99999999999"):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", bad)
        with pytest.raises(FormatError):
            source_date_epoch()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    assert source_date_epoch() == 1767225600


def test_parse_sig_is_strict_about_line_endings_and_digits() -> None:
    digest = hashlib.sha256(b"").hexdigest().encode()
    with pytest.raises(FormatError, match="CR line endings"):
        parse_sig(digest + b"\r\nts: 1\r\n")
    with pytest.raises(FormatError, match="not an integer"):
        parse_sig(digest + b"\nts: +1_0\n")
