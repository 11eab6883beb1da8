"""`fwbuild eeprom ...` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from fwbuild.eeprom.image import parse_image, read_timestamp, replace_file
from fwbuild.eeprom.pubkey import encode_pubkey_bin
from fwbuild.eeprom.synthetic import DEFAULT_BOOTCONF, synthetic_image
from fwbuild.keys import load_boot_key

CONFIG = "[all]\nBOOT_UART=1\nBOOT_ORDER=0xf7\nHTTP_HOST=boot.example.org\nHTTP_PATH=walt-vpn/node/aa\n"


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "pieeprom.bin"
    result = CliRunner().invoke(main, ["eeprom", "synth", str(path)])
    assert result.exit_code == 0, result.output
    assert path.read_bytes() == synthetic_image("ab")
    return path


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["eeprom", *args])
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


def test_help() -> None:
    code, out, _ = run("--help")
    assert code == 0
    for command in ("inspect", "extract", "edit", "verify", "diff", "synth"):
        assert command in out


def test_synth_non_ab(tmp_path: Path) -> None:
    code, _, _ = run("synth", str(tmp_path / "n.bin"), "--layout", "non-ab")
    assert code == 0 and parse_image((tmp_path / "n.bin").read_bytes()).layout == "non-ab"


def test_inspect(image: Path) -> None:
    code, out, _ = run("inspect", str(image))
    assert code == 0
    assert "layout:       ab (virtual" in out and "BOOT_ORDER=0xf461" in out and "cacert.der" in out
    code, out, _ = run("inspect", str(image), "--json")
    info = json.loads(out)
    assert info["virtual"] is True and info["config"] == DEFAULT_BOOTCONF.decode()


def test_extract(image: Path, tmp_path: Path) -> None:
    code, out, _ = run("extract", str(image))
    assert code == 0 and out == DEFAULT_BOOTCONF.decode()
    code, _, _ = run("extract", str(image), "--file", "cacert.der", "--out", str(tmp_path / "ca.der"))
    assert code == 0 and (tmp_path / "ca.der").read_bytes() == bytes(2048)
    code, _, err = run("extract", str(image), "--file", "nope.txt")
    assert code == 1 and err.startswith("Error: no `nope.txt` file")


def test_edit_is_the_reference_config_update(image: Path, tmp_path: Path, session_keys: Path) -> None:
    config = tmp_path / "boot.conf"
    config.write_text(CONFIG)
    out = tmp_path / "out.bin"
    code, _, err = run("edit", str(image), "--out", str(out), "--config", str(config),
                       "--pubkey", str(session_keys / "boot-signing.pub.pem"))
    assert code == 0, err
    key = load_boot_key(session_keys / "boot-signing.pem")
    expected = replace_file(replace_file(image.read_bytes(), "bootconf.txt", CONFIG.encode()),
                            "pubkey.bin", encode_pubkey_bin(key.public_key()))
    assert out.read_bytes() == expected
    assert read_timestamp(out.read_bytes()) is None


def test_edit_sign_verify_diff(image: Path, tmp_path: Path, session_keys: Path) -> None:
    config = tmp_path / "boot.conf"
    config.write_text(CONFIG)
    signed = tmp_path / "signed.bin"
    code, _, err = run("edit", str(image), "--out", str(signed), "--config", str(config),
                       "--sign-key", str(session_keys / "boot-signing.pem"), "--timestamp", "1700000000")
    assert code == 0, err
    assert read_timestamp(signed.read_bytes()) == 1700000000
    code, out, _ = run("verify", str(signed), "--key", str(session_keys / "boot-signing.pub.pem"))
    assert code == 0 and out.startswith("OK:") and "signed (rsa2048)" in out
    code, _, err = run("verify", str(image), "--key", str(session_keys / "boot-signing.pem"))
    assert code == 1 and err.startswith("Error: pubkey.bin is empty")
    code, out, _ = run("diff", str(image), str(signed))
    assert code == 1 and "+BOOT_ORDER=0xf7" in out
    code, out, _ = run("diff", str(image), str(image))
    assert code == 0 and out.strip() == "identical"


def test_edit_refuses_bad_input(image: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("[all]\nHTTP_HOST=http://x\n")
    out = tmp_path / "out.bin"
    code, _, err = run("edit", str(image), "--out", str(out), "--config", str(bad))
    assert code == 1 and err.splitlines()[0] == \
        "Error: HTTP_HOST 'http://x' has a URL scheme (bad.conf:2 HTTP_HOST)"
    assert not out.exists()
    code, _, _ = run("edit", str(image), "--out", str(out), "--config", str(bad), "--no-validate")
    assert code == 0 and parse_image(out.read_bytes()).read_file("bootconf.txt") == bad.read_bytes()
    big = tmp_path / "ca.der"
    big.write_bytes(bytes(2284))
    code, _, err = run("edit", str(image), "--out", str(tmp_path / "o2.bin"), "--cacert", str(big))
    assert code == 1 and "4 over" in err and not (tmp_path / "o2.bin").exists()
    short = tmp_path / "short.bin"
    short.write_bytes(image.read_bytes()[:1000])
    code, _, err = run("inspect", str(short))
    assert code == 1 and err.startswith("Error: EEPROM image is 1000 bytes")
    code, _, err = run("verify", str(short))
    assert code == 1
    code, _, err = run("inspect", str(tmp_path / "missing.bin"))
    assert code == 2


def test_edit_config_of_a_signed_image_needs_the_sign_key(tmp_path: Path, session_keys: Path) -> None:
    from fwbuild.keys import KeyPaths

    runner = CliRunner()
    base, signed, out = tmp_path / "base.bin", tmp_path / "signed.bin", tmp_path / "out.bin"
    assert runner.invoke(main, ["eeprom", "synth", str(base)]).exit_code == 0
    conf = tmp_path / "conf.txt"
    conf.write_text("[all]\nBOOT_UART=1\nBOOT_ORDER=0xf41\n")
    key = str(KeyPaths(session_keys).boot_key)
    assert runner.invoke(main, ["eeprom", "edit", str(base), "--out", str(signed), "--config", str(conf),
                                "--sign-key", key]).exit_code == 0
    conf.write_text("[all]\nBOOT_UART=1\nBOOT_ORDER=0xf1\n")
    stale = runner.invoke(main, ["eeprom", "edit", str(signed), "--out", str(out), "--config", str(conf)])
    assert stale.exit_code == 2 and "stale signature" in stale.output and not out.exists()
    resigned = runner.invoke(main, ["eeprom", "edit", str(signed), "--out", str(out), "--config", str(conf),
                                    "--sign-key", key])
    assert resigned.exit_code == 0
    assert runner.invoke(main, ["eeprom", "verify", str(out), "--key", key]).exit_code == 0


def test_pi4_synth_inspect_extract_edit_verify(tmp_path: Path) -> None:
    pi4 = tmp_path / "pi4.bin"
    code, _, err = run("synth", str(pi4), "--soc", "2711")
    assert code == 0, err
    assert pi4.read_bytes() == synthetic_image("non-ab", "2711") and len(pi4.read_bytes()) == 512 * 1024
    code, _, err = run("synth", str(tmp_path / "x.bin"), "--soc", "2711", "--layout", "ab")
    assert code == 2 and "2711 (Raspberry Pi 4) images have no 'ab' layout" in err
    code, out, _ = run("inspect", str(pi4))
    assert code == 0 and "board:        Raspberry Pi 4 (2711)" in out and "bootconf.txt    " in out
    config = tmp_path / "boot.conf"
    config.write_text("[all]\nBOOT_UART=1\nBOOT_ORDER=0xf21\n[pi4]\nPOWER_OFF_ON_HALT=1\n")
    out_image = tmp_path / "out.bin"
    code, _, err = run("edit", str(pi4), "--config", str(config), "--out", str(out_image), "--timestamp", "5")
    assert code == 0 and err == "", err
    result = CliRunner().invoke(main, ["eeprom", "extract", str(out_image)])
    assert result.exit_code == 0 and result.stdout_bytes == config.read_bytes()  # byte for byte
    code, out, _ = run("verify", str(out_image))
    assert code == 0 and out.startswith(f"OK: {out_image}: 2711 non-ab layout, virtual")
    code, out, _ = run("diff", str(pi4), str(out_image))
    assert code == 1 and "+BOOT_ORDER=0xf21" in out and "timestamp: None -> 5" in out


def test_unknown_key_warns_and_strict_refuses(image: Path, tmp_path: Path) -> None:
    config = tmp_path / "typo.conf"
    config.write_text("[all]\nBOOT_UART=1\nBOOT_ORDR=0xf1\n")
    out = tmp_path / "out.bin"
    code, _, err = run("edit", str(image), "--config", str(config), "--out", str(out))
    assert code == 0
    assert err.splitlines() == ["Warning: unknown key BOOT_ORDR: the bootloader ignores it (typo.conf:3 BOOT_ORDR)",
                                "Hint: did you mean BOOT_ORDER?"]
    code, _, err = run("verify", str(out))
    assert code == 0 and "did you mean BOOT_ORDER?" in err
    code, _, err = run("verify", str(out), "--strict")
    assert code == 1 and "refused in strict mode" in err
    strict_out = tmp_path / "strict.bin"
    code, _, err = run("edit", str(image), "--config", str(config), "--out", str(strict_out), "--strict")
    assert code == 1 and "did you mean BOOT_ORDER?" in err and not strict_out.exists()
    code, _, err = run("edit", str(image), "--config", str(config), "--out", str(strict_out), "--strict",
                       "--no-validate")
    assert code == 2 and not strict_out.exists()
