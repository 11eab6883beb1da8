"""The recovery kit's inputs and file-mode rule, shared by `recovery archive|image|write`.

`make_kit` decides where the kit's files come from (an existing archive, or an EEPROM
image with the real or a fake recovery.bin) and refuses contradicting choices; `Kit.mode`
is the rule for every file the kit is written to: 0600 when its EEPROM image carries
node credentials (WALT_VPN_CREDS), 0644 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..fsutil import mode_for
from ..sign import source_date_epoch
from .archive import fake_recovery_bin, kit_files, read_recovery_archive


@dataclass(frozen=True)
class Kit:
    files: dict[str, bytes]
    epoch: int
    fake: bool = False  # a FAKE recovery.bin (virtual tests only)

    @property
    def mode(self) -> int:
        """The mode of anything the kit is written to (0600: it carries node credentials)."""
        return mode_for(self.files["pieeprom.bin"])

    @property
    def private(self) -> bool:
        return self.mode == 0o600


def make_kit(from_archive: Path | None, eeprom: Path | None, recovery_bin: Path | None,
             virtual: bool, epoch: int | None) -> Kit:
    """The kit's files and epoch, from an archive or from `eeprom` + `recovery_bin`/`virtual`."""
    if from_archive:
        if eeprom or recovery_bin or virtual:
            raise UsageError("--from excludes --eeprom, --recovery-bin and --virtual")
        kit = read_recovery_archive(from_archive.read_bytes(), str(from_archive))
        return Kit(kit.files, kit.epoch)
    if not eeprom:
        raise UsageError("give --eeprom IMAGE (or --from ARCHIVE)")
    if bool(recovery_bin) == virtual:
        raise UsageError("give exactly one of --recovery-bin FILE and --virtual",
                         hint="the real recovery.bin comes from rpi-eeprom's firmware-2712/")
    rbin = recovery_bin.read_bytes() if recovery_bin else fake_recovery_bin()
    ts = epoch if epoch is not None else source_date_epoch()
    return Kit(kit_files(rbin, eeprom.read_bytes(), ts), ts, fake=virtual)
