"""Host file I/O helpers: atomic writes so nothing is ever half-written."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

from .layout import refuse_published


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` through a temp file in the same directory and os.replace.

    The temp file is created 0600 and chmod'ed to `mode` before the rename, so a
    secret is never readable by others, even for an instant. A published artifact set
    is never written (layout.refuse_published): only the build's publish step makes one.
    """
    target = Path(path)
    refuse_published(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _about(exc, target) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _about(exc, target) from None
        raise


def _about(exc: OSError, target: Path) -> OSError:
    """The same error, naming the file the caller asked for, never the temp file (and, when a
    part of the path is a file, which part)."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocking = next((p for p in target.parents if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            return NotADirectoryError(errno.ENOTDIR, f"{blocking} is a file, not a directory", str(target))
    return type(exc)(exc.errno, exc.strerror, str(target)) if exc.errno else exc


SECRET_MARKERS = (b"WALT_VPN_CREDS=",)


def mode_for(*contents: bytes) -> int:
    """0600 when any of `contents` carries node credentials (an EEPROM config with
    WALT_VPN_CREDS, raw or inside an image), else 0644."""
    return 0o600 if any(marker in data for data in contents for marker in SECRET_MARKERS) else 0o644


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
