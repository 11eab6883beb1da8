"""The real pipeline on the virtual recipe: complete, verifiable, reproducible (downloads arm64 .debs)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "bootimg/boot.img", "bootimg/boot.sig",
    "eeprom/enforced/pieeprom.bin", "eeprom/enforced/pieeprom.sig",
    "eeprom/permissive/pieeprom.bin", "eeprom/permissive/pieeprom.sig",
    "eeprom/recovery/pieeprom.bin", "eeprom/recovery/pieeprom.sig",
    "initramfs/initramfs_2712", "initramfs/initramfs_2712.provenance.json",
    "recovery/rpi-5-sd-recovery.tar.gz",
}

pytestmark = pytest.mark.slow


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_virtual_build_verifies_and_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    runner = CliRunner()
    # keys.dir is relative to the recipe file: a copy of the recipe keeps the keys in tmp_path.
    shutil.copy(ROOT / "recipes" / "virtual.toml", tmp_path / "virtual.toml")
    recipe = str(tmp_path / "virtual.toml")
    first = runner.invoke(main, ["build", recipe, "--init-keys", "--out", "out"])
    assert first.exit_code == 0, first.output
    out = tmp_path / "out" / "virtual"
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == EXPECTED
    assert manifest["source_date_epoch"] == 1767225600
    assert any(p["name"] == "openssh-client" for p in manifest["packages"])
    assert os.stat(tmp_path / "keys" / "boot-signing.pem").st_mode & 0o777 == 0o600
    verified = runner.invoke(main, ["verify", str(out), "--key", str(tmp_path / "keys" / "boot-signing.pub.pem")])
    assert verified.exit_code == 0, verified.output
    before = _files(out)
    # No secret in any served artifact: the boot-signing key's private part appears nowhere.
    secret = (tmp_path / "keys" / "boot-signing.pem").read_text().splitlines()[1].encode()
    assert not any(secret in data for data in before.values())

    # Rebuild after touching every source the recipe reads: identical bytes.
    for path in [*(ROOT / "recipes").rglob("*"), tmp_path / "virtual.toml"]:
        os.utime(path, None)
    second = runner.invoke(main, ["build", recipe, "--out", "out"])
    assert second.exit_code == 0, second.output
    assert _files(out) == before

    # A tampered artifact is caught by verify, with the path named.
    tampered = tmp_path / "copy"
    shutil.copytree(out, tampered)
    boot = tampered / "bootimg" / "boot.img"
    blob = bytearray(boot.read_bytes())
    blob[4096] ^= 1
    boot.write_bytes(bytes(blob))
    bad = runner.invoke(main, ["verify", str(tampered)])
    assert bad.exit_code == 1
    assert "boot.img" in bad.output and bad.output.startswith("Error: ")
