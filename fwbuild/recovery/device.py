"""Write the recovery disk image to an SD card (or a file), then read it back and verify.

Safety first for block devices: refuse a partition (give the whole card), a disk
that holds the running system (`/`), a disk with a mounted (or swap) partition,
and a disk that the kernel does not flag removable. `describe_target` says what
will be erased so the CLI can ask for confirmation before `write_kit`.

The facts come from a `DeviceProbe`; `SysfsProbe(root)` reads `<root>/sys/block`,
`<root>/proc/self/mounts` and `<root>/proc/swaps`, so tests pass a fake tree
(a regular file `<root>/dev/<name>` stands for the device `<name>`).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import BuildError, UsageError
from ..progress import Progress, report_bytes
from .diskimage import read_disk_image

CHUNK = 1 << 20
GPT_BACKUP_BYTES = 33 * 512  # backup GPT: 32 sectors of entries + the header


class DeviceProbe(Protocol):
    """What the writer needs to know about block devices (kernel names like `sdb`)."""

    def device_name(self, target: Path) -> str | None:
        """The kernel name of the block device at `target`, or None for a regular file."""

    def disk_of(self, name: str) -> str | None:
        """The whole disk that `name` is or is a partition of (None: unknown)."""

    def disk_facts(self, disk: str) -> tuple[int, str, bool, tuple[str, ...]]:
        """(size in bytes, model, removable, partition names) of a whole disk."""

    def mounted(self) -> list[tuple[str, str]]:
        """(kernel name, mount point or "[swap]") of every mounted or swap block device."""

    def root_device(self) -> str | None:
        """The kernel name of the device holding `/`."""

    def slaves(self, name: str) -> list[str]:
        """Devices under a device-mapper / md device (LVM, LUKS, RAID)."""


class SysfsProbe:
    """A DeviceProbe reading sysfs and procfs under `root` (`/` on a live system)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)
        self.sys_block = self.root / "sys" / "block"

    def _read(self, path: Path) -> str:
        try:
            return path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def _name_of_devnum(self, rdev: int) -> str | None:
        link = self.root / "sys" / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}"
        return Path(os.path.realpath(link)).name if link.exists() else None

    def _name_of_source(self, source: str) -> str | None:
        if not source.startswith("/dev/"):
            return None
        if self.root == Path("/"):
            source = os.path.realpath(source)  # /dev/disk/by-uuid/..., /dev/mapper/x -> /dev/dm-0
        return Path(source).name

    def device_name(self, target: Path) -> str | None:
        try:
            st = os.stat(target)
        except FileNotFoundError:
            return None
        if stat.S_ISBLK(st.st_mode):
            return self._name_of_devnum(st.st_rdev) or Path(os.path.realpath(target)).name
        dev_dir = (self.root / "dev").resolve()
        if Path(target).resolve().parent == dev_dir and self.disk_of(Path(target).name):
            return Path(target).name  # a stand-in file of a fake tree
        return None

    def disk_of(self, name: str) -> str | None:
        if (self.sys_block / name).is_dir():
            return name
        if self.sys_block.is_dir():
            for disk in sorted(self.sys_block.iterdir()):
                if (disk / name / "partition").exists():
                    return disk.name
        return None

    def disk_facts(self, disk: str) -> tuple[int, str, bool, tuple[str, ...]]:
        base = self.sys_block / disk
        sectors = self._read(base / "size")
        size = int(sectors) * 512 if sectors.isdigit() else 0
        vendor = self._read(base / "device" / "vendor")
        model = self._read(base / "device" / "model") or self._read(base / "device" / "name")
        removable = self._read(base / "removable") == "1"
        parts = tuple(sorted(p.name for p in base.iterdir() if (p / "partition").exists())) \
            if base.is_dir() else ()
        return size, " ".join(x for x in (vendor, model) if x) or "unknown model", removable, parts

    def slaves(self, name: str) -> list[str]:
        """Devices under a device-mapper / md device (LVM, LUKS, RAID)."""
        disk = self.disk_of(name) or name
        folder = self.sys_block / disk / "slaves"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def mounted(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for line in self._read(self.root / "proc" / "self" / "mounts").splitlines():
            fields = line.split()
            if len(fields) >= 2 and (name := self._name_of_source(fields[0])):
                out.append((name, fields[1].replace("\\040", " ")))
        for line in self._read(self.root / "proc" / "swaps").splitlines()[1:]:
            fields = line.split()
            if fields and (name := self._name_of_source(fields[0])):
                out.append((name, "[swap]"))
        return out

    def root_device(self) -> str | None:
        if self.root == Path("/"):
            name = self._name_of_devnum(os.stat("/").st_dev)
            if name:
                return name
        for name, mountpoint in self.mounted():
            if mountpoint == "/":
                return name
        return None


def _disks(probe: DeviceProbe, name: str, depth: int = 0) -> set[str]:
    """The whole disks under a device name, following device-mapper slaves."""
    disk = probe.disk_of(name)
    found = {disk} if disk else set()
    if depth < 8:
        for slave in probe.slaves(name):
            found |= _disks(probe, slave, depth + 1)
    return found


@dataclass(frozen=True)
class TargetInfo:
    """What `write_kit` will overwrite."""

    path: Path
    block_device: str | None  # kernel name; None for a regular file
    size: int | None = None
    model: str = ""
    removable: bool = False
    partitions: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.block_device is None:
            return f"{self.path}: a regular file (it will be replaced)"
        parts = ", ".join(self.partitions) or "none"
        size = f"{(self.size or 0) / 1e9:.1f} GB"
        kind = "removable" if self.removable else "NOT removable"
        return (f"{self.path} ({self.block_device}): {self.model}, {size}, {kind}; partitions: "
                f"{parts}. EVERYTHING ON IT WILL BE ERASED.")


def _check_plain_file_target(target: Path, where: str) -> None:
    """Only a regular file (new or existing) outside /dev may be replaced by an image file:
    never a FIFO, a character device, or a /dev/sdX that is not there (an unplugged card)."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        if Path(os.path.realpath(target)).parent == Path("/dev"):
            raise UsageError("no such device", where, "is the card inserted? `lsblk` lists the disks") from None
        return
    if not stat.S_ISREG(st.st_mode):
        raise UsageError("the target is neither a block device nor a regular file", where,
                         "give the SD card's whole-disk device (e.g. /dev/sdX) or an image file path")


def describe_target(target: Path, probe: DeviceProbe | None = None, *,
                    allow_non_removable: bool = False) -> TargetInfo:
    """Check that `target` may be overwritten and say what it holds; UsageError when refused."""
    probe = probe or SysfsProbe()
    target = Path(target)
    where = str(target)
    if target.is_dir():
        raise UsageError("the target is a directory", where, "give a device or an image file")
    name = probe.device_name(target)
    if name is None:
        _check_plain_file_target(target, where)
        return TargetInfo(target, None)
    disk = probe.disk_of(name)
    if disk is None:
        raise UsageError(f"{name} is not a disk the kernel lists in /sys/block", where)
    if disk != name:
        raise UsageError(f"{name} is a partition of {disk}", where,
                         f"give the whole card, e.g. /dev/{disk}")
    size, model, removable, partitions = probe.disk_facts(disk)
    root = probe.root_device()
    if root is not None and disk in _disks(probe, root):
        raise UsageError(f"{disk} holds the running system (/ is on {root})", where,
                         "pick the SD card, not the system disk (see `lsblk`)")
    busy = sorted({f"{dev} on {point}" for dev, point in probe.mounted()
                   if disk in _disks(probe, dev)})
    if busy:
        raise UsageError(f"{disk} is in use: {', '.join(busy)}", where,
                         f"unmount it first (e.g. `udisksctl unmount -b /dev/{disk}1`)")
    if not removable and not allow_non_removable:
        raise UsageError(f"{disk} ({model}) is not a removable disk", where,
                         "check the device name; a built-in SD reader may report non-removable: "
                         "then pass --allow-non-removable")
    return TargetInfo(target, disk, size, model, removable, partitions)


@dataclass(frozen=True)
class WriteReport:
    """The outcome of `write_kit`: bytes written and each verified file's sha256."""

    target: Path
    block_device: str | None
    bytes_written: int
    files: dict[str, str]


def _file_hashes(image: bytes, where: str) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest()
            for path, data in read_disk_image(image, where).files().items()}


def _write(fd: int, image: bytes, sparse: bool, progress: Progress | None) -> None:
    view = memoryview(image)
    zero = bytes(CHUNK)
    report_bytes(progress, "write", 0, len(image))
    for offset in range(0, len(image), CHUNK):
        chunk = view[offset:offset + CHUNK]
        if not (sparse and chunk == zero[:len(chunk)]):  # a sparse file skips zero blocks
            os.pwrite(fd, chunk, offset)
        report_bytes(progress, "write", offset + len(chunk), len(image))
    if sparse:
        os.ftruncate(fd, len(image))
    os.fsync(fd)


def _read_back(path: Path, size: int, progress: Progress | None) -> bytes:
    out = bytearray()
    report_bytes(progress, "verify", 0, size)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read the card, not the cache
        while len(out) < size:
            block = os.read(fd, min(CHUNK, size - len(out)))
            if not block:
                break
            out += block
            report_bytes(progress, "verify", len(out), size)
    finally:
        os.close(fd)
    return bytes(out)


def _verify(path: Path, image: bytes, expected: dict[str, str], progress: Progress | None) -> None:
    written = _read_back(path, len(image), progress)
    if len(written) < len(image):
        raise BuildError(f"read back {len(written)} of {len(image)} bytes", str(path),
                         "the card is smaller than the image or failing")
    actual = _file_hashes(written, str(path))
    bad = sorted(p for p in expected.keys() | actual.keys() if expected.get(p) != actual.get(p))
    if bad:
        raise BuildError(f"verification failed: {', '.join(bad)} differ after writing", str(path),
                         "the card may be faulty or fake; try another one")


def write_kit(
    target: Path,
    image: bytes,
    progress: Progress | None = None,
    probe: DeviceProbe | None = None,
    *,
    allow_non_removable: bool = False,
) -> WriteReport:
    """Write the recovery disk `image` to `target` (a card or a file), sync, read back, verify.

    A regular file is written sparse to a temp file, verified, then renamed over
    `target` (nothing half-written). A device is checked by `describe_target`
    first, opened exclusively, written, fsync'ed, and re-read bypassing the cache.
    """
    target = Path(target)
    info = describe_target(target, probe, allow_non_removable=allow_non_removable)
    expected = _file_hashes(image, "recovery disk image")
    if info.block_device is None:
        tmp = target.with_name(f".{target.name}.fwbuild-tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # name the target, not the temp file
            raise type(exc)(exc.errno, exc.strerror, str(target)) from None
        try:
            try:
                _write(fd, image, True, progress)
            finally:
                os.close(fd)
            _verify(tmp, image, expected, progress)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    else:
        if info.size and info.size < len(image):
            raise UsageError(f"{info.block_device} holds {info.size} bytes, the image needs "
                             f"{len(image)}", str(target))
        flags = os.O_WRONLY | os.O_CLOEXEC
        is_block = stat.S_ISBLK(os.stat(target).st_mode)
        if is_block:
            flags |= os.O_EXCL  # block devices: fails with EBUSY while anything has it mounted
        fd = os.open(target, flags)
        try:
            if is_block and info.size and info.size >= len(image) + GPT_BACKUP_BYTES:
                # A card that held a GPT keeps its backup header in the last sectors; tools
                # would then report a damaged GPT next to our MBR. Zero it.
                os.pwrite(fd, bytes(GPT_BACKUP_BYTES), info.size - GPT_BACKUP_BYTES)
            _write(fd, image, False, progress)
        finally:
            os.close(fd)
        _verify(target, image, expected, progress)
    return WriteReport(target, info.block_device, len(image), expected)
