"""The emulated Pi 5 bootloader: walk BOOT_ORDER like the real one, verify what HTTP boot fetches.

It reads a node's `pieeprom.bin` (bootconf.txt, pubkey.bin), tries each boot mode from
the least significant BOOT_ORDER nibble, and returns the kernel, initramfs and cmdline
to start. Its log lines read like the bootloader's UART log: each mode tried, each
verification result. HTTP boot follows pi5-boot-facts §4: `boot.sig` then `boot.img`
from `http://HTTP_HOST:HTTP_PORT/HTTP_PATH/`, SHA-256 and RSA-2048 checked against the
EEPROM's `pubkey.bin`, falling through to the next mode on any failure.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from ..bootimg.fat import read_all
from ..eeprom.bootconf import parse_bootconf
from ..eeprom.image import (
    AB_MARKER_NAME,
    AB_PARTITION_A,
    AB_PARTITION_B,
    PAD_MAGIC,
    SECTION_FMT,
    parse_image,
)
from ..eeprom.pubkey import decode_pubkey_bin
from ..errors import FormatError, FwbuildError, SignatureError
from ..sign import parse_sig, verify_sig

MAX_BOOT_IMG = 96 * 1000 * 1000
HTTP_TIMEOUT = (5, 30)
Log = Callable[[str], None]


class _SourceAdapter(HTTPAdapter):
    """HTTP from a given source address (the virtual node's own address on walt-net)."""

    def __init__(self, source: str) -> None:
        self._source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self._source, 0)
        super().init_poolmanager(*args, **kwargs)


class BootFailure(FwbuildError):
    """The bootloader found nothing it may boot (STOP, or the restart bound reached)."""


@dataclass(frozen=True)
class BootSelection:
    mode: str                 # "http" or "sd"
    kernel: bytes
    initramfs: bytes | None
    cmdline: str
    bootconf: str             # the EEPROM config the OS reads (blconfig / fw_cfg)
    files: dict[str, bytes]


@dataclass(frozen=True)
class RecoveryFlash:
    """recovery.bin on the SD card flashed a new EEPROM (the board then stops)."""

    new_eeprom: bytes


def _usable(image: bytes) -> bool:
    try:
        parsed = parse_image(image)
        parsed.read_file("bootconf.txt")
    except FormatError:
        return False
    return True


def running_image(flash: bytes, log: Log = lambda line: None) -> bytes:
    """The EEPROM image the bootloader runs from the SPI flash's content.

    Partition A when it parses; otherwise, on the AB layout, the complete copy the node's
    staged write leaves in partition B (its write-then-switch, see the init's vpn-eeprom).
    Whether the real Pi 5 bootloader falls back to partition B is UNCONFIRMED
    (pi5-boot-facts 1.2 measures the layout only); the virtual Pi 5 does. Raises
    FormatError when neither is usable (the board would not boot).
    """
    if _usable(flash):
        return flash
    a0, a1 = AB_PARTITION_A
    b0, b1 = AB_PARTITION_B
    if len(flash) >= b1 and a1 - a0 == b1 - b0:
        pad = struct.pack(SECTION_FMT, PAD_MAGIC, b1 - b0 - 8) + b"\xff" * (b1 - b0 - 8)
        copy = flash[:a0] + flash[b0:b1] + pad + flash[b1:]
        name = flash[b0 + 8:b0 + 20].rstrip(b"\0")
        if name == AB_MARKER_NAME.encode() and _usable(copy):
            log("EEPROM: partition A is not valid (an interrupted update): running the copy in partition B")
            return copy
    parse_image(flash).read_file("bootconf.txt")  # raises the FormatError that says why
    raise FormatError("the EEPROM flash holds no usable image", "SPI flash")


def boot_order(value: str) -> list[int]:
    """BOOT_ORDER nibbles, least significant (tried first) first."""
    number = int(value, 16)
    nibbles = []
    while number:
        nibbles.append(number & 0xF)
        number >>= 4
    return nibbles


def _parse_config_txt(text: str) -> tuple[str, str | None]:
    """(kernel file, initramfs file) from a config.txt ([all] semantics only)."""
    kernel, initramfs = "kernel_2712.img", None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("kernel="):
            kernel = line.split("=", 1)[1].strip()
        elif line.startswith(("initramfs ", "ramfsfile=")):
            initramfs = line.replace("=", " ", 1).split()[1]
    return kernel, initramfs


def _selection(mode: str, files: dict[str, bytes], bootconf: str, where: str) -> BootSelection:
    lower = {name.lower(): data for name, data in files.items()}
    if "config.txt" not in lower:
        raise FormatError("no config.txt", where, "a Pi 5 boot filesystem needs config.txt")
    kernel_name, initramfs_name = _parse_config_txt(lower["config.txt"].decode("ascii", "replace"))
    if kernel_name.lower() not in lower:
        raise FormatError(f"kernel {kernel_name} named by config.txt is missing", where)
    initramfs = None
    if initramfs_name is not None:
        if initramfs_name.lower() not in lower:
            raise FormatError(f"initramfs {initramfs_name} named by config.txt is missing", where)
        initramfs = lower[initramfs_name.lower()]
    cmdline = lower.get("cmdline.txt", b"").decode("ascii", "replace").strip()
    return BootSelection(mode, lower[kernel_name.lower()], initramfs, cmdline, bootconf, files)


class Bootloader:
    def __init__(self, eeprom: bytes, *, sd: Path | None = None, log: Log = lambda line: None,
                 max_restarts: int = 2, session: requests.Session | None = None,
                 walt_net: Mapping[tuple[str, int], tuple[str, int]] | None = None,
                 source_address: str | None = None) -> None:
        self.image = parse_image(eeprom)
        self.bootconf = self.image.read_file("bootconf.txt").decode("ascii", "replace")
        self.config = parse_bootconf(self.bootconf)
        self.sd = sd
        self.log = log
        self.max_restarts = max_restarts
        self.session = session or requests.Session()
        # The virtual walt-net: where a (host, port) the EEPROM names really listens, and
        # the node's own address (the server binds node identity to it).
        self.walt_net = dict(walt_net or {})
        if source_address is not None:
            adapter = _SourceAdapter(source_address)
            self.session.mount("http://", adapter)

    def run(self) -> BootSelection | RecoveryFlash:
        flashed = self._rom_recovery()
        if flashed is not None:
            return flashed
        order_text = self.config.get("BOOT_ORDER", "0xf41")
        order = boot_order(order_text)
        self.log(f"BOOT_ORDER {order_text}: " + " ".join(f"{n:x}" for n in order))
        for round_number in range(self.max_restarts + 1):
            for nibble in order:
                result = self._try(nibble)
                if result is not None:
                    return result
                if nibble == 0xE:
                    raise BootFailure("STOP: BOOT_ORDER reached mode e; nothing was booted",
                                      "virtual bootloader", "see the log above for why each mode failed")
                if nibble == 0xF:
                    break
            else:
                raise BootFailure("end of BOOT_ORDER reached; nothing was booted", "virtual bootloader")
            if round_number < self.max_restarts:
                self.log(f"Boot mode: RESTART (f): restart {round_number + 1} of {self.max_restarts}")
        raise BootFailure(f"nothing booted after {self.max_restarts} restarts", "virtual bootloader",
                          "the real board would keep restarting; see the log above")

    def _try(self, nibble: int) -> BootSelection | RecoveryFlash | None:
        if nibble == 0x7:
            return self._http()
        if nibble == 0x1:
            return self._sd()
        if nibble == 0x2:
            self.log("Boot mode: NETWORK (2): TFTP is not emulated by the virtual Pi 5, skipped")
        elif nibble in (0xE, 0xF):
            self.log(f"Boot mode: {'STOP' if nibble == 0xE else 'RESTART'} ({nibble:x})")
        else:
            self.log(f"Boot mode: {nibble:x}: no such device on the virtual Pi 5, skipped")
        return None

    def _http(self) -> BootSelection | None:
        host = self.config.get("HTTP_HOST")
        port = self.config.get("HTTP_PORT", "80")
        path = self.config.get("HTTP_PATH", "net_install").strip("/")
        if not host:
            self.log("Boot mode: HTTP (7): no HTTP_HOST set (the Raspberry Pi server is not emulated), skipped")
            return None
        base = f"http://{host}:{port}/{path}"
        self.log(f"Boot mode: HTTP (7): {base}/boot.sig")
        if port.isdigit() and (host, int(port)) in self.walt_net:
            real_host, real_port = self.walt_net[(host, int(port))]
            base = f"http://{real_host}:{real_port}/{path}"
        try:
            pubkey = decode_pubkey_bin(self.image.read_file("pubkey.bin"))
        except FormatError as exc:
            self.log(f"HTTP: no customer pubkey.bin ({exc.what}): only Raspberry Pi-signed images boot; next mode")
            return None
        try:
            sig_bytes = self._get(f"{base}/boot.sig", 4096)
            image = self._get(f"{base}/boot.img", MAX_BOOT_IMG)
            sig = parse_sig(sig_bytes, "boot.sig")
            if sig.rsa2048 is None:
                raise SignatureError("boot.sig has no rsa2048 line (all HTTP downloads must be signed)")
            verify_sig(image, sig, pubkey, require_rsa=True, where="boot.img")
        except FwbuildError as exc:
            self.log(f"HTTP: {exc}: boot.img rejected; next mode")
            return None
        self.log(f"HTTP: boot.img {len(image)} bytes sha256 {hashlib.sha256(image).hexdigest()[:16]}: "
                 "hash OK, RSA signature OK (pubkey.bin)")
        try:
            return _selection("http", read_all(image, "boot.img"), self.bootconf, "boot.img")
        except FwbuildError as exc:
            self.log(f"HTTP: {exc}; next mode")
            return None

    def _get(self, url: str, limit: int) -> bytes:
        try:
            response = self.session.get(url, timeout=HTTP_TIMEOUT, stream=True)
        except requests.RequestException as exc:
            raise FwbuildError(f"GET {url} failed: {type(exc).__name__}") from None
        with response:
            if response.status_code != 200:
                raise FwbuildError(f"GET {url} answered HTTP {response.status_code}")
            body = bytearray()
            for block in response.iter_content(1 << 16):
                body += block
                if len(body) > limit:
                    raise FwbuildError(f"GET {url}: larger than {limit} bytes")
        return bytes(body)

    def _sd(self) -> BootSelection | RecoveryFlash | None:
        if self.sd is None:
            self.log("Boot mode: SD (1): no card inserted; next mode")
            return None
        self.log(f"Boot mode: SD (1): {self.sd}")
        try:
            files = _read_card(self.sd)
        except FwbuildError as exc:
            self.log(f"SD: {exc}; next mode")
            return None
        try:
            return _selection("sd", files, self.bootconf, str(self.sd))
        except FwbuildError as exc:
            self.log(f"SD: {exc}; next mode")
            return None

    def _rom_recovery(self) -> RecoveryFlash | None:
        """The boot ROM runs recovery.bin from the SD card before the EEPROM bootloader
        (pi5-boot-facts §5): this is how the kit resets any board, even an enforced one."""
        if self.sd is None:
            return None
        try:
            files = {name.lower(): data for name, data in _read_card(self.sd).items()}
        except FwbuildError:
            return None
        if "recovery.bin" not in files:
            return None
        self.log("ROM: recovery.bin found on the SD card: running it instead of the EEPROM bootloader")
        if "pieeprom.bin" not in files:
            self.log("SD: recovery.bin: no pieeprom.bin on the card: nothing to flash (red LED); stopping")
            raise BootFailure("recovery.bin found no pieeprom.bin to flash", str(self.sd))
        image = files["pieeprom.bin"]
        try:
            parse_image(image)
            if "pieeprom.sig" in files:
                verify_sig(image, parse_sig(files["pieeprom.sig"], "pieeprom.sig"), where="pieeprom.sig")
        except FwbuildError as exc:
            self.log(f"SD: recovery.bin: {exc}: EEPROM not flashed (red LED); stopping")
            raise BootFailure(f"recovery kit rejected: {exc.what}", str(self.sd)) from None
        self.log(f"SD: recovery.bin: flashing pieeprom.bin sha256 {hashlib.sha256(image).hexdigest()[:16]}"
                 " ... done (green screen, green LED blinking fast)")
        return RecoveryFlash(image)


def _read_card(card: Path) -> dict[str, bytes]:
    """A virtual SD card: a directory (its boot partition) or a raw FAT image file."""
    if card.is_dir():
        return {str(p.relative_to(card)): p.read_bytes() for p in sorted(card.rglob("*")) if p.is_file()}
    if card.is_file():
        return read_all(card.read_bytes(), str(card))
    raise FormatError("virtual SD card not found", str(card), "give a directory or a FAT image file")
