"""The SD recovery archive `rpi-5-sd-recovery.tar.gz` (pi5-boot-facts §5). Pure: bytes in, bytes out.

Members (sorted): `README.txt`, `pieeprom.bin` (exactly 2 MiB), `pieeprom.sig`
(sha256, `ts:`, `target-soc: 2712`), `recovery.bin`. Reproducible: mtime =
epoch, uid/gid 0, no user/group names, mode 0644, ustar format, gzip header
mtime 0 and no file name.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import PurePosixPath

from ..errors import FormatError, SignatureError
from ..layout import RECOVERY_KIT
from ..sign import build_sig, parse_sig, verify_sig

ARCHIVE_NAME = PurePosixPath(RECOVERY_KIT.rel).name  # rpi-5-sd-recovery.tar.gz
PIEEPROM_SIZE = 2 * 1024 * 1024
RECOVERY_BIN_MAX = 512 * 1024  # the real 2712 recovery.bin is ~105 KB
TARGET_SOC = "2712"
KIT_FILES = ("README.txt", "pieeprom.bin", "pieeprom.sig", "recovery.bin")

_FAKE_MARKER = b"FWBUILD-FAKE-RECOVERY-BIN: NOT REAL RASPBERRY PI FIRMWARE, FOR VIRTUAL TESTS ONLY\n"
_FAKE_SIZE = 105 * 1024


def fake_recovery_bin() -> bytes:
    """A deterministic ~105 KB stand-in for recovery.bin, marked as not real firmware."""
    out = bytearray(_FAKE_MARKER)
    counter = 0
    while len(out) < _FAKE_SIZE:
        out += hashlib.sha256(b"fwbuild fake recovery.bin %d" % counter).digest()
        counter += 1
    return bytes(out[:_FAKE_SIZE])


def is_fake_recovery_bin(data: bytes) -> bool:
    return data.startswith(_FAKE_MARKER)


def validate_kit_inputs(recovery_bin: bytes, pieeprom: bytes) -> None:
    """Raise FormatError unless pieeprom is 2 MiB and recovery.bin plausible (1 B .. 512 KiB)."""
    if len(pieeprom) != PIEEPROM_SIZE:
        raise FormatError(f"pieeprom.bin is {len(pieeprom)} bytes, a Pi 5 EEPROM image is exactly "
                          f"{PIEEPROM_SIZE} (2 MiB)", "pieeprom.bin",
                          "give a full EEPROM image (pieeprom-*.bin), not an update or a config")
    if not recovery_bin:
        raise FormatError("recovery.bin is empty", "recovery.bin")
    if len(recovery_bin) >= RECOVERY_BIN_MAX:
        raise FormatError(f"recovery.bin is {len(recovery_bin)} bytes; the Pi 5 one is ~105 KB "
                          f"(limit {RECOVERY_BIN_MAX})", "recovery.bin",
                          "give the 2712 recovery.bin from rpi-eeprom (firmware-2712/)")


def render_readme(recovery_bin: bytes, pieeprom: bytes) -> str:
    """README.txt for a kit (what it does, how to use it, LED/screen, VPN credentials wiped)."""
    template = resources.files(__package__).joinpath("README.txt").read_text("utf-8")
    note = ""
    if is_fake_recovery_bin(recovery_bin):
        note = ("\n  NOTE: this recovery.bin is a FAKE placeholder made for virtual tests.\n"
                "  It is not firmware and does nothing on a real board.")
    return template.format(
        eeprom_sha256=hashlib.sha256(pieeprom).hexdigest(),
        recovery_sha256=hashlib.sha256(recovery_bin).hexdigest(),
        recovery_note=note,
    )


def kit_files(recovery_bin: bytes, pieeprom: bytes, epoch: int,
              readme: str | None = None) -> dict[str, bytes]:
    """The kit's files {name: bytes}: README.txt, pieeprom.bin, pieeprom.sig, recovery.bin."""
    validate_kit_inputs(recovery_bin, pieeprom)
    text = render_readme(recovery_bin, pieeprom) if readme is None else readme
    return {
        "README.txt": text.encode("utf-8"),
        "pieeprom.bin": bytes(pieeprom),
        "pieeprom.sig": build_sig(pieeprom, epoch, target_soc=TARGET_SOC),
        "recovery.bin": bytes(recovery_bin),
    }


def pack_tar_gz(files: dict[str, bytes], epoch: int) -> bytes:
    """A reproducible .tar.gz of flat files: sorted, mtime=epoch, root:root 0644, gzip mtime 0."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime = max(int(epoch), 0)
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(files[name]))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def recovery_archive(recovery_bin: bytes, pieeprom: bytes, epoch: int,
                     readme: str | None = None) -> bytes:
    """`rpi-5-sd-recovery.tar.gz` for `pieeprom` (any 2 MiB image, e.g. a per-node one)."""
    return pack_tar_gz(kit_files(recovery_bin, pieeprom, epoch, readme), epoch)


@dataclass(frozen=True)
class RecoveryKit:
    """The files of a recovery archive and its epoch (the members' mtime)."""

    files: dict[str, bytes]
    epoch: int


def read_recovery_archive(data: bytes, where: str = ARCHIVE_NAME) -> RecoveryKit:
    """Parse and check a recovery archive: the four files, flat, pieeprom.sig matching."""
    files: dict[str, bytes] = {}
    epoch = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar.getmembers():
                if not member.isfile() or member.name not in KIT_FILES:
                    raise FormatError(f"unexpected member {member.name!r} in the recovery archive",
                                      where, f"a kit holds only {', '.join(KIT_FILES)}")
                if member.name in files:
                    raise FormatError(f"member {member.name!r} appears twice", where)
                handle = tar.extractfile(member)
                assert handle is not None
                files[member.name] = handle.read()
                if member.name == "pieeprom.bin":
                    epoch = int(member.mtime)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise FormatError(f"not a readable .tar.gz: {exc}", where) from None
    missing = [name for name in KIT_FILES if name not in files]
    if missing:
        raise FormatError(f"the recovery archive lacks {', '.join(missing)}", where,
                          "make it with `fwbuild recovery archive`")
    validate_kit_inputs(files["recovery.bin"], files["pieeprom.bin"])
    sig = parse_sig(files["pieeprom.sig"], f"{where}:pieeprom.sig")
    try:
        verify_sig(files["pieeprom.bin"], sig, where=f"{where}:pieeprom.sig")
    except SignatureError as exc:
        raise FormatError(exc.what, exc.where, "the archive is damaged; rebuild it") from None
    return RecoveryKit(files, epoch)
