"""The node's EEPROM helper (`vpn-eeprom` in the VPN init), run on the host with busybox.

The same shell code runs in the initramfs; here the virtual SPI flash is a plain file
(`VPN_EEPROM_FLASH`), and `VPN_EEPROM_STEPS` cuts the power after N write steps.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fwbuild.eeprom.assemble import assemble_eeprom
from fwbuild.eeprom.image import parse_image
from fwbuild.eeprom.synthetic import synthetic_image
from fwbuild.virtual.bootloader import running_image
from fwbuild.virtual.vpnboot import write_vpn_init

BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="needs busybox")
TOOLS = ("sh", "od", "tr", "cut", "dd", "awk", "grep", "head", "tail", "wc", "cmp", "sha256sum",
         "cp", "sed", "cat", "printf")


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The helper as the init installs it, with a PATH of busybox applets only."""
    work = tmp_path_factory.mktemp("vpn-eeprom")
    helper = write_vpn_init(work / "initroot").parent / "bin" / "vpn-eeprom"
    script = work / "vpn-eeprom"
    script.write_text(helper.read_text().replace("#!/bin/sh", f"#!{BUSYBOX} sh", 1))
    script.chmod(0o755)
    bindir = work / "bin"
    bindir.mkdir()
    for name in TOOLS:
        (bindir / name).symlink_to(BUSYBOX or "busybox")
    return script


def run(tool: Path, *args: str, flash: Path | None = None, steps: int | None = None
        ) -> subprocess.CompletedProcess[str]:
    # The helper's scratch files have fixed names under $TMPDIR (the initramfs' /tmp is its
    # own): a private TMPDIR per call keeps concurrent runs on one host apart.
    env = {"PATH": str(tool.parent / "bin"), "TMPDIR": tempfile.mkdtemp(dir=tool.parent)}
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
        "newer": assemble_eeprom(base, "[all]\nBOOT_ORDER=0xf7\nHTTP_HOST=10.0.2.101\n"
                                 "WALT_VPN_MAC=52:54:00:00:00:01\n", boot_key=key, timestamp=300),
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


# ---- the init's every-boot check (eeprom_update), with the SSH gate stubbed -------------------

def run_update(tool: Path, tmp_path: Path, flash: Path, *, digest: str, image: Path | None,
               gate_fails: bool = False) -> subprocess.CompletedProcess[str]:
    """Source the init in busybox sh and run eeprom_update; ssh_gate and reboot are stubs."""
    root = tmp_path / "initroot"
    init = write_vpn_init(root)
    gate = ('ssh_gate() { echo "walt-vpn: server unreachable (connection refused)" > "$ETMP/gate.err"; '
            'return 2; }' if gate_fails else
            f'ssh_gate() {{ case "$1" in eeprom-digest) echo {digest} > "$2" ;; '
            f'eeprom-image) cat {image} > "$2" ;; esac; }}')
    body = "\n".join([
        f"FWBUILD_INIT_ROOT={root}", f". {init}", f"EEPROM_TOOL={tool}", gate,
        'say() { echo "walt-vpn: $*"; }', "sleep() { :; }",
        # The real reboot never returns; the stub ends the subshell the flash runs in.
        "reboot() { echo REBOOTING >&2; exit 0; }", "sync() { :; }",
        "BACKOFF_FIRST=1; BACKOFF_MAX=4", "eeprom_update", "echo BOOTING-ON"])
    env = {"PATH": str(tool.parent / "bin"), "VPN_EEPROM_FLASH": str(flash), "TMPDIR": str(tmp_path)}
    return subprocess.run([BUSYBOX or "busybox", "sh", "-c", body], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_every_boot_matching_digest_flashes_nothing(tool: Path, images: dict[str, Path],
                                                    tmp_path: Path) -> None:
    flash = tmp_path / "flash.bin"
    shutil.copy(images["new"], flash)
    result = run_update(tool, tmp_path, flash, digest=_sha(images["new"]), image=None)
    out = result.stdout + result.stderr
    assert "nothing to flash" in out and "BOOTING-ON" in out and "step" not in out, out
    assert flash.read_bytes() == images["new"].read_bytes()


def test_every_boot_new_digest_flashes_verifies_and_reboots(tool: Path, images: dict[str, Path],
                                                            tmp_path: Path) -> None:
    flash = tmp_path / "flash.bin"
    shutil.copy(images["old"], flash)
    result = run_update(tool, tmp_path, flash, digest=_sha(images["new"]), image=images["new"])
    out = result.stdout + result.stderr
    assert "walt-vpn: flash: EEPROM written and verified by read-back" in out and "REBOOTING" in out, out
    assert flash.read_bytes() == images["new"].read_bytes()


@pytest.mark.parametrize("bad", ["other-key", "truncated", "garbage"])
def test_every_boot_bad_image_is_not_flashed_and_the_node_boots_on(
        tool: Path, images: dict[str, Path], tmp_path: Path, bad: str) -> None:
    flash = tmp_path / "flash.bin"
    shutil.copy(images["old"], flash)
    result = run_update(tool, tmp_path, flash, digest=_sha(images[bad]), image=images[bad])
    lines = [line for line in result.stdout.splitlines() if line.startswith("walt-vpn: flash: image refused")]
    assert len(lines) == 3, result.stdout  # one line per attempt, EEPROM_RETRIES = 3
    assert lines[-1].endswith("booting with the current EEPROM (attempt 3/3)")
    assert "BOOTING-ON" in result.stdout and "REBOOTING" not in result.stdout
    assert flash.read_bytes() == images["old"].read_bytes()


def test_every_boot_gate_unreachable_backs_off_then_boots_on(tool: Path, images: dict[str, Path],
                                                             tmp_path: Path) -> None:
    flash = tmp_path / "flash.bin"
    shutil.copy(images["old"], flash)
    result = run_update(tool, tmp_path, flash, digest="", image=None, gate_fails=True)
    assert result.stdout.splitlines() == [
        "walt-vpn: flash: the SSH gate's eeprom-digest failed (server unreachable (connection refused));"
        f" {tail}" for tail in ("retrying in 1s (attempt 1/3)", "retrying in 2s (attempt 2/3)",
                                "booting with the current EEPROM (attempt 3/3)")] + ["BOOTING-ON"]
    assert flash.read_bytes() == images["old"].read_bytes()


# ---- the Pi 5 backend: flashrom on /dev/spidev10.0 (a fake flashrom records what it is asked) --

FAKE_FLASHROM = """#!{busybox} sh
# fake flashrom: the chip is $FAKE_CHIP, its content the file $FAKE_FLASH
echo "$*" >> "$FAKE_LOG"
case "$3" in
    --flash-name) echo 'vendor="Winbond" name="'"$FAKE_CHIP"'"' ;;
    -r) cat "$FAKE_FLASH" > "$4" ;;
    -w) cat "$4" > "$FAKE_FLASH" ;;
esac
"""


@pytest.mark.parametrize(("chip", "ok"), [("W25Q16.V", True), ("MX25L1606E", False)])
def test_pi5_backend_flashrom_refuses_unknown_chips(tool: Path, images: dict[str, Path], tmp_path: Path,
                                                    chip: str, ok: bool) -> None:
    bindir = tmp_path / "bin"
    shutil.copytree(tool.parent / "bin", bindir, symlinks=True)
    fake = bindir / "flashrom"
    fake.write_text(FAKE_FLASHROM.format(busybox=BUSYBOX))
    fake.chmod(0o755)
    spidev = tmp_path / "spidev10.0"
    spidev.touch()
    flash, log = tmp_path / "chip.bin", tmp_path / "flashrom.log"
    shutil.copy(images["old"], flash)
    env = {"PATH": str(bindir), "VPN_EEPROM_SPIDEV": str(spidev), "FAKE_CHIP": chip,
           "FAKE_FLASH": str(flash), "FAKE_LOG": str(log), "TMPDIR": str(tmp_path)}
    result = subprocess.run([BUSYBOX or "busybox", "sh", str(tool), "flash", str(images["new"]),
                             str(images["old"])], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    calls = log.read_text().splitlines()
    programmer = f"-p linux_spi:dev={spidev},spispeed=16000"
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
        assert flash.read_bytes() == images["new"].read_bytes()
        assert calls[0] == f"{programmer} --flash-name"
        assert sum(call.startswith(f"{programmer} -w ") for call in calls) == 9  # one per staged step
    else:
        assert result.returncode == 1
        assert result.stdout.strip() == (f"unknown flash chip 'MX25L1606E' on {spidev} (known: W25Q16.V "
                                         "W25Q16.W W25Q16JV_M W25Q16JW W25Q16JW_DTR): refusing to flash")
        assert calls == [f"{programmer} --flash-name"]
        assert flash.read_bytes() == images["old"].read_bytes()


@pytest.mark.parametrize("steps", range(3, 10))
def test_reflash_from_a_broken_partition_a_keeps_b_until_a_is_whole(
        tool: Path, images: dict[str, Path], tmp_path: Path, steps: int) -> None:
    """A power cut left A erased (B holds `new`); the next update (`new` -> `newer`)
    rewrites A before it touches B: every step boundary still boots."""
    flash = tmp_path / "flash.bin"
    shutil.copy(images["old"], flash)
    assert run(tool, "flash", str(images["new"]), str(images["old"]), flash=flash, steps=3).returncode == 3
    broken = tmp_path / "broken.bin"
    shutil.copy(flash, broken)
    result = run(tool, "flash", str(images["newer"]), str(broken), flash=flash, steps=steps)
    assert result.returncode == (0 if steps == 9 else 3), result.stdout + result.stderr
    assert "partition A is broken, B holds the running copy: rewriting A first" in result.stderr
    assert "step 1/9" not in result.stderr and "step 2/9" not in result.stderr
    conf = parse_image(running_image(flash.read_bytes())).read_file("bootconf.txt").decode()
    assert "HTTP_HOST=" + ("10.0.2.100" if steps < 5 else "10.0.2.101") in conf
    if steps == 9:
        assert flash.read_bytes() == images["newer"].read_bytes()
