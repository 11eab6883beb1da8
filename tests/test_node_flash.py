"""The node's EEPROM helper (`vpn-eeprom` in the VPN init), run on the host with busybox.

The same shell code runs in the initramfs; here the virtual SPI flash is a plain file
(`VPN_EEPROM_FLASH`), and `VPN_EEPROM_STEPS` cuts the power after N write steps.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fwbuild.eeprom.assemble import assemble_eeprom
from fwbuild.eeprom.image import parse_image
from fwbuild.eeprom.synthetic import synthetic_image
from fwbuild.virtual.bootloader import running_image
from fwbuild.virtual.vpnboot import render_vpn_init

BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="needs busybox")
TOOLS = ("sh", "od", "tr", "cut", "dd", "awk", "grep", "head", "tail", "wc", "cmp", "sha256sum",
         "cp", "sed", "cat", "printf")


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The helper as the init installs it, with a PATH of busybox applets only."""
    work = tmp_path_factory.mktemp("vpn-eeprom")
    match = re.search(r"cat > \"\$1/vpn-eeprom\" <<'FWBUILD_HELPER_EOF'\n(.*?)\nFWBUILD_HELPER_EOF",
                      render_vpn_init(), re.DOTALL)
    assert match
    script = work / "vpn-eeprom"
    script.write_text(match.group(1) + "\n")
    bindir = work / "bin"
    bindir.mkdir()
    for name in TOOLS:
        (bindir / name).symlink_to(BUSYBOX or "busybox")
    return script


def run(tool: Path, *args: str, flash: Path | None = None, steps: int | None = None
        ) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(tool.parent / "bin")}
    if flash is not None:
        env["VPN_EEPROM_FLASH"] = str(flash)
    if steps is not None:
        env["VPN_EEPROM_STEPS"] = str(steps)
    return subprocess.run([BUSYBOX or "busybox", "sh", str(tool), *args], check=False, env=env, cwd=tool.parent,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("images")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    base = synthetic_image()
    data = {
        "old": assemble_eeprom(base, "[all]\nBOOT_ORDER=0xf127\nHTTP_HOST=10.0.2.100\n", boot_key=key,
                               timestamp=100),
        "new": assemble_eeprom(base, "[all]\nBOOT_ORDER=0xf7\nHTTP_HOST=10.0.2.100\n"
                               "WALT_VPN_MAC=52:54:00:00:00:01\n", boot_key=key, timestamp=200),
        "other-key": assemble_eeprom(base, "[all]\nBOOT_ORDER=0xf7\n", boot_key=other_key, timestamp=200),
        "non-ab": assemble_eeprom(synthetic_image("non-ab"), "[all]\nBOOT_ORDER=0xf7\n", boot_key=key,
                                  timestamp=200),
    }
    data["truncated"] = data["new"][:-4096]
    data["garbage"] = os.urandom(len(data["new"]))
    paths = {}
    for name, content in data.items():
        paths[name] = work / f"{name}.bin"
        paths[name].write_bytes(content)
    return paths


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_check_accepts_the_expected_image(tool: Path, images: dict[str, Path]) -> None:
    result = run(tool, "check", str(images["new"]), _sha(images["new"]), str(images["old"]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(("name", "digest_of", "why"), [
    ("new", None, "is not the digest the server expects"),
    ("other-key", "other-key", "its pubkey.bin is not the boot key this node booted with"),
    ("truncated", "truncated", "not a 2712 EEPROM image: image is 2093056 bytes"),
    ("garbage", "garbage", "not a 2712 EEPROM image: bad section magic"),
])
def test_check_refuses_with_one_line(tool: Path, images: dict[str, Path], name: str,
                                     digest_of: str | None, why: str) -> None:
    digest = _sha(images[digest_of]) if digest_of else "0" * 64
    result = run(tool, "check", str(images[name]), digest, str(images["old"]))
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == 1 and why in result.stdout, result.stdout


def test_flash_writes_reads_back_and_matches(tool: Path, images: dict[str, Path], tmp_path: Path) -> None:
    flash = tmp_path / "flash.bin"
    shutil.copy(images["old"], flash)
    result = run(tool, "flash", str(images["new"]), str(images["old"]), flash=flash)
    assert result.returncode == 0, result.stdout + result.stderr
    assert flash.read_bytes() == images["new"].read_bytes()
    assert result.stderr.splitlines()[-1] == "walt-vpn: flash: step 9/9: B body"
    read = run(tool, "read", str(tmp_path / "read.bin"), flash=flash)
    assert read.returncode == 0 and (tmp_path / "read.bin").read_bytes() == images["new"].read_bytes()


@pytest.mark.parametrize("steps", range(10))
def test_power_cut_after_any_step_leaves_a_bootable_flash(tool: Path, images: dict[str, Path],
                                                          tmp_path: Path, steps: int) -> None:
    """Write-then-switch through partition B: every intermediate flash boots old or new."""
    flash = tmp_path / "flash.bin"
    shutil.copy(images["old"], flash)
    result = run(tool, "flash", str(images["new"]), str(images["old"]), flash=flash, steps=steps)
    assert result.returncode == (0 if steps == 9 else 3), result.stdout + result.stderr
    log: list[str] = []
    image = running_image(flash.read_bytes(), log.append)
    conf = parse_image(image).read_file("bootconf.txt").decode()
    assert "BOOT_ORDER=" + ("0xf127" if steps < 3 else "0xf7") in conf
    assert bool(log) == (steps in (3, 4)), log  # A erased / half written: B's copy runs


def test_non_ab_image_is_written_in_one_pass(tool: Path, images: dict[str, Path], tmp_path: Path) -> None:
    flash = tmp_path / "flash.bin"
    shutil.copy(images["old"], flash)
    result = run(tool, "flash", str(images["non-ab"]), str(images["old"]), flash=flash)
    assert result.returncode == 0, result.stdout
    assert flash.read_bytes() == images["non-ab"].read_bytes()
    assert result.stderr.strip() == "walt-vpn: flash: step 1/1: whole image"


def test_no_flash_device_is_one_line(tool: Path) -> None:
    result = run(tool, "backend")
    assert result.returncode == 1
    assert result.stdout.startswith("no EEPROM flash device") and len(result.stdout.splitlines()) == 1
