"""The emulated bootloader: BOOT_ORDER walk, HTTP boot verification, SD fallback, recovery."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fwbuild.bootimg.bootimg import build_boot_image, sign_boot_image
from fwbuild.eeprom.assemble import assemble_eeprom, pieeprom_sig
from fwbuild.eeprom.bootconf import render_bootconf
from fwbuild.eeprom.synthetic import synthetic_image
from fwbuild.keys import KeyPaths, init_keys, load_boot_key
from fwbuild.virtual.bootloader import BootFailure, Bootloader, RecoveryFlash, boot_order

EPOCH = 1767225600
FILES = {
    "config.txt": b"kernel=kernel_2712.img\ninitramfs initramfs_2712 followkernel\n",
    "cmdline.txt": b"console=ttyAMA0\n",
    "kernel_2712.img": b"KERNEL" * 100,
    "initramfs_2712": b"INITRAMFS" * 100,
}


class _Served:
    files: dict[str, bytes] = {}  # noqa: RUF012 - replaced whole by each test


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = _Served.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


def _eeprom(keys: Path, variant: str, port: int) -> bytes:
    text = render_bootconf(variant, {"http_host": "127.0.0.1", "http_port": port, "http_path": "n/x"})
    return assemble_eeprom(synthetic_image(), text, boot_key=load_boot_key(KeyPaths(keys).boot_key),
                           timestamp=EPOCH)


def _serve(keys: Path, tamper: bool = False) -> None:
    image = build_boot_image(FILES, EPOCH)
    sig = sign_boot_image(image, load_boot_key(KeyPaths(keys).boot_key), EPOCH)
    if tamper:
        changed = bytearray(image)
        changed[len(changed) // 2] ^= 0xFF
        image = bytes(changed)
    _Served.files = {"/n/x/boot.sig": sig, "/n/x/boot.img": image}


def _sd(tmp_path: Path) -> Path:
    card = tmp_path / "sd"
    card.mkdir()
    for name, data in FILES.items():
        (card / name).write_bytes(data.replace(b"KERNEL", b"SDKERN"))
    return card


def test_boot_order_is_read_from_the_least_significant_nibble() -> None:
    assert boot_order("0xf127") == [7, 2, 1, 0xF]
    assert boot_order("0xf7") == [7, 0xF]


def test_enforced_http_boot_verifies_and_selects_the_kernel(session_keys: Path, port: int) -> None:
    _serve(session_keys)
    log: list[str] = []
    result = Bootloader(_eeprom(session_keys, "enforced", port), log=log.append).run()
    assert not isinstance(result, RecoveryFlash)
    assert result.mode == "http"
    assert result.kernel == FILES["kernel_2712.img"]
    assert result.initramfs == FILES["initramfs_2712"]
    assert result.cmdline == "console=ttyAMA0"
    assert "BOOT_ORDER=0xf7" in result.bootconf
    assert any("hash OK, RSA signature OK" in line for line in log)


def test_tampered_image_enforced_node_boots_nothing(session_keys: Path, port: int, tmp_path: Path) -> None:
    _serve(session_keys, tamper=True)
    log: list[str] = []
    with pytest.raises(BootFailure) as info:
        Bootloader(_eeprom(session_keys, "enforced", port), sd=_sd(tmp_path), log=log.append,
                   max_restarts=2).run()
    assert "after 2 restarts" in info.value.what
    assert sum("SHA-256 mismatch" in line for line in log) == 3
    assert not any(line.startswith("Boot mode: SD") for line in log), "enforced never tries the SD card"


def test_tampered_image_permissive_node_falls_back_to_sd(session_keys: Path, port: int, tmp_path: Path) -> None:
    _serve(session_keys, tamper=True)
    log: list[str] = []
    result = Bootloader(_eeprom(session_keys, "permissive", port), sd=_sd(tmp_path), log=log.append).run()
    assert not isinstance(result, RecoveryFlash)
    assert result.mode == "sd" and result.kernel.startswith(b"SDKERN")
    assert any("TFTP is not emulated" in line for line in log)


def test_image_signed_by_another_key_is_rejected(session_keys: Path, port: int, tmp_path: Path) -> None:
    other = init_keys(tmp_path / "other")
    _serve(other.directory)
    log: list[str] = []
    with pytest.raises(BootFailure):
        Bootloader(_eeprom(session_keys, "enforced", port), log=log.append, max_restarts=0).run()
    assert any("rsa2048 signature does not verify" in line for line in log)


def test_recovery_card_flashes_even_an_enforced_board(session_keys: Path, port: int, tmp_path: Path) -> None:
    card = tmp_path / "card"
    card.mkdir()
    kit = _eeprom(session_keys, "recovery", port)
    (card / "recovery.bin").write_bytes(b"fake")
    (card / "pieeprom.bin").write_bytes(kit)
    (card / "pieeprom.sig").write_bytes(pieeprom_sig(kit, EPOCH))
    log: list[str] = []
    result = Bootloader(_eeprom(session_keys, "enforced", port), sd=card, log=log.append).run()
    assert isinstance(result, RecoveryFlash) and result.new_eeprom == kit
    assert any("green LED" in line for line in log)
    assert not any("Boot mode: HTTP" in line for line in log), "the ROM runs recovery.bin first"


def test_corrupt_recovery_kit_flashes_nothing(session_keys: Path, port: int, tmp_path: Path) -> None:
    card = tmp_path / "card"
    card.mkdir()
    kit = _eeprom(session_keys, "recovery", port)
    (card / "recovery.bin").write_bytes(b"fake")
    (card / "pieeprom.bin").write_bytes(kit[:-1] + b"\x00")
    (card / "pieeprom.sig").write_bytes(pieeprom_sig(kit, EPOCH))
    log: list[str] = []
    with pytest.raises(BootFailure, match="recovery kit rejected"):
        Bootloader(_eeprom(session_keys, "enforced", port), sd=card, log=log.append).run()
    assert any("red LED" in line for line in log)
