"""The artifact set the server hands out: a build output directory (`out/<recipe>/`).

Files are looked up by fixed names only (never from URL text). Their sha256 (the ETag)
is computed once per (device, inode, size, mtime) and cached, so a new build published
atomically over the old one is picked up on the next request. `boot.sig` comes from the
build when it matches `boot.img`, else it is signed once per boot.img digest with the
boot-signing key and cached in the state directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from fwbuild import layout
from fwbuild.errors import FormatError, FwbuildError
from fwbuild.fsutil import atomic_write
from fwbuild.sign import build_sig, parse_sig

log = logging.getLogger("fwbuild.server")

# The set's files, relative to its directory (fwbuild.layout spells them).
BOOT_IMG = Path(layout.BOOT_IMG.rel)
BOOT_SIG = Path(layout.BOOT_SIG.rel)
RECOVERY = Path(layout.RECOVERY_KIT.rel)
MANIFEST = Path(layout.MANIFEST)


def eeprom_image(variant: str) -> Path:
    """`eeprom/<variant>/pieeprom.bin` of a set."""
    return Path(layout.EEPROM_IMAGE(variant).rel)


class ArtifactMissing(FwbuildError):
    """An artifact the request needs is not in the artifact directory."""


@dataclass(frozen=True)
class FileInfo:
    path: Path
    size: int
    mtime: float
    sha256: str

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'


class DigestCache:
    """sha256 of files, keyed by their stat identity (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, int, int, int], str] = {}

    def digest_fd(self, fd: int) -> tuple[os.stat_result, str]:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return st, cached
        digest = hashlib.sha256()
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            digest.update(chunk)
            offset += len(chunk)
        value = digest.hexdigest()
        with self._lock:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = value
        return st, value


class ArtifactSet:
    def __init__(self, directory: Path, state_dir: Path, boot_key: rsa.RSAPrivateKey) -> None:
        self.directory = directory
        self._sig_dir = state_dir / "sigcache"
        self._boot_key = boot_key
        self.digests = DigestCache()
        self._sig_lock = threading.Lock()
        self._sigs: dict[str, bytes] = {}

    def open(self, relative: Path) -> tuple[int, FileInfo]:
        """An open fd (caller closes) and the file's info; ArtifactMissing when absent."""
        path = self.directory / relative
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ArtifactMissing(f"{relative} is not in the artifact set", str(self.directory),
                                  "build it (`fwbuild build RECIPE`) or fix server.artifacts"
                                  ) from None
        except OSError as exc:
            raise ArtifactMissing(f"{relative} cannot be opened: {exc.strerror}", str(self.directory)) from None
        try:
            st, digest = self.digests.digest_fd(fd)
        except OSError as exc:
            os.close(fd)
            raise ArtifactMissing(f"{relative} cannot be read: {exc.strerror}", str(self.directory)) from None
        except BaseException:
            os.close(fd)
            raise
        return fd, FileInfo(path, st.st_size, st.st_mtime, digest)

    def info(self, relative: Path) -> FileInfo:
        fd, info = self.open(relative)
        os.close(fd)
        return info

    def read(self, relative: Path) -> tuple[bytes, FileInfo]:
        fd, info = self.open(relative)
        try:
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read()
        finally:
            os.close(fd)
        if hashlib.sha256(data).hexdigest() != info.sha256:  # replaced while reading
            return self.read(relative)
        return data, FileInfo(info.path, len(data), info.mtime, info.sha256)

    def sign_timestamp(self, fallback: float) -> int:
        """The `ts:` of a boot.sig made here: the build's SOURCE_DATE_EPOCH, else the mtime."""
        try:
            manifest = json.loads((self.directory / MANIFEST).read_text("utf-8"))
            value = manifest.get("source_date_epoch", manifest.get("SOURCE_DATE_EPOCH"))
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        except (OSError, ValueError, AttributeError):
            pass
        return int(fallback)

    def boot_sig(self, boot: FileInfo) -> bytes:
        """The boot.sig of `boot`: the build's own; signed here once only when the set has none.

        A build's boot.sig that does not match its boot.img means the artifact set was
        altered after it was built: the server refuses (503) rather than sign whatever
        boot.img it finds, so a tampered set never gets a valid signature from it.
        """
        with self._sig_lock:
            cached = self._sigs.get(boot.sha256)
        if cached is not None:
            return cached
        sig = self._build_sig_if_matching(boot) or self._cached_or_signed(boot)
        with self._sig_lock:
            self._sigs[boot.sha256] = sig
        return sig

    def _build_sig_if_matching(self, boot: FileInfo) -> bytes | None:
        path = self.directory / BOOT_SIG
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArtifactMissing(f"cannot read boot.sig: {exc.strerror}", str(path)) from None
        try:
            parsed = parse_sig(data, str(BOOT_SIG))
        except FormatError as exc:
            raise ArtifactMissing(f"the artifact set's boot.sig is malformed: {exc.what}", str(path),
                                  "rebuild the set; `fwbuild verify` checks it") from None
        if parsed.sha256 != boot.sha256 or parsed.rsa2048 is None:
            log.error("artifact set altered: boot.sig does not match boot.img; refusing to serve it")
            raise ArtifactMissing("boot.sig does not match boot.img: the artifact set was altered "
                                  "after it was built", str(path),
                                  "rebuild it with `fwbuild build`; `fwbuild verify` shows what differs")
        return data

    def _cached_or_signed(self, boot: FileInfo) -> bytes:
        cache = self._sig_dir / f"{boot.sha256}.sig"
        try:
            data = cache.read_bytes()
            if parse_sig(data).sha256 == boot.sha256:
                return data
        except (OSError, FormatError):
            pass
        image, info = self.read(BOOT_IMG)
        if info.sha256 != boot.sha256:
            raise ArtifactMissing("boot.img changed while signing it", str(info.path),
                                  "retry the request")
        sig = build_sig(image, self.sign_timestamp(boot.mtime), key=self._boot_key)
        atomic_write(cache, sig, 0o644)
        log.info("signed boot.img %s once (cached)", boot.sha256[:16])
        return sig

    def manifest(self) -> dict[str, object] | None:
        """The set's manifest.json, or None when absent or unreadable."""
        try:
            value = json.loads((self.directory / MANIFEST).read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def is_virtual(self) -> bool:
        """Built from a virtual recipe (its manifest says so): synthetic EEPROMs allowed."""
        recipe = (self.manifest() or {}).get("recipe")
        return isinstance(recipe, dict) and recipe.get("target") == "virtual"

    def check(self, modes: tuple[str, ...]) -> list[str]:
        """Problems that keep this set from being served (empty: servable)."""
        problems: list[str] = []
        if not self.directory.is_dir():
            return [f"artifact set {self.directory} does not exist (or is not a directory)"]
        try:
            self.info(BOOT_IMG)
        except ArtifactMissing as exc:
            problems.append(f"{self.directory / BOOT_IMG}: {exc.what}")
        if not self.is_virtual():
            for mode in modes:
                base = self.directory / eeprom_image(mode)
                if not base.is_file():
                    problems.append(f"{base}: missing EEPROM base image for boot mode {mode!r} "
                                    "(only a set built from a virtual recipe may do without)")
        return problems

    def eeprom_base(self, variant: str) -> bytes | None:
        """The build's EEPROM image of `variant`, or None when the set has none."""
        try:
            data, _ = self.read(eeprom_image(variant))
        except ArtifactMissing:
            return None
        return data

    def versions(self) -> dict[str, dict[str, object]]:
        """sha256 + size of each artifact present (status page, admin API)."""
        found: dict[str, dict[str, object]] = {}
        candidates = [BOOT_IMG, BOOT_SIG, RECOVERY, MANIFEST]
        eeprom_dir = self.directory / layout.EEPROM_DIR
        if eeprom_dir.is_dir():
            for variant in sorted(p.name for p in eeprom_dir.iterdir() if p.is_dir()):
                candidates += [eeprom_image(variant), Path(layout.EEPROM_SIG(variant).rel)]
        for relative in candidates:
            try:
                info = self.info(relative)
            except (ArtifactMissing, OSError):
                continue
            found[str(relative)] = {"sha256": info.sha256, "size": info.size,
                                    "mtime": int(info.mtime)}
        return found
