"""The build cache: one directory (`FWBUILD_CACHE`, default `~/.cache/fwbuild`), one layout.

Every subdirectory belongs to this module; other modules ask it for their paths and
never join names onto `root` themselves:

  sha256/<2 hex>/<64 hex>          immutable blobs named by their digest: pinned sources,
                                   downloaded .debs, step outputs (`store_*`, `lookup`)
  tmp/                             downloads and copies in progress (never looked up)
  steps/<64 hex>.json              step-cache index: a step's key (its name, fwbuild's code
                                   digest, its input digests) -> the blobs of its artifacts and
                                   the packages it pinned (`step_index`, fwbuild.pipeline)
  compressed/<method>-<level>-<64 hex>
                                   compression memo: an archive compressed, keyed by the digest
                                   of the uncompressed bytes (`compressed`, initramfs and boot image)
  staged/<64 hex>/                 a .deb unpacked, keyed by the .deb's sha256 (`staged_dir`)
  apt/<16 hex>/                    an apt session's state for one set of sources: lists/,
                                   cache/archives/, etc/, state/, lists.complete (`apt_dir`)
  apt/<16 hex>/resolved/<32 hex>.json
                                   resolution memo: packages + signed lists -> pins (`resolved_memo`)
  rootfs/<32 hex>/                 a built Debian root image and its record (`rootfs_dir`)
  stubs/<64 hex>.so                a compiled stub library, keyed by its source, flags and
                                   compiler version (`stub_memo`, fwbuild/initramfs/stub.py)

Blobs enter `sha256/` only after their digest matched: a wrong or partial download never
does. Every memo is checked when read; a damaged entry is a miss and is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from .errors import SourceError

Area = Literal["sha256", "tmp", "steps", "compressed", "staged", "apt", "rootfs", "stubs"]
AREAS: tuple[Area, ...] = get_args(Area)


@dataclass(frozen=True)
class Cache:
    root: Path

    @classmethod
    def default(cls) -> Cache:
        env = os.environ.get("FWBUILD_CACHE")
        root = Path(env) if env else Path.home() / ".cache" / "fwbuild"
        return cls(root)

    def area(self, name: Area) -> Path:
        """The top-level subdirectory `name` (one of AREAS, as the module docstring lays out)."""
        return self.root / name

    # --- sha256/ and tmp/ ----------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.area("sha256") / sha256[:2] / sha256

    def lookup(self, sha256: str) -> Path | None:
        path = self.blob_path(sha256)
        return path if path.is_file() else None

    def tmpdir(self) -> Path:
        """Where writers put a file in progress (then `commit` it)."""
        path = self.area("tmp")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, tmp: Path, sha256: str) -> Path:
        """Move the checked temp file `tmp` (of digest `sha256`) to its blob path."""
        target = self.blob_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        return target

    def store_bytes(self, data: bytes) -> tuple[str, Path]:
        digest = hashlib.sha256(data).hexdigest()
        existing = self.lookup(digest)
        if existing:
            return digest, existing
        fd, name = tempfile.mkstemp(dir=self.tmpdir())
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return digest, self.commit(Path(name), digest)
        finally:
            Path(name).unlink(missing_ok=True)

    def store_file(self, path: Path, expected_sha256: str | None = None) -> tuple[str, Path]:
        """Copy a local file into the cache (checked against `expected_sha256` when given)."""
        fd, name = tempfile.mkstemp(dir=self.tmpdir())
        tmp = Path(name)
        try:
            digest = hashlib.sha256()
            with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
            actual = digest.hexdigest()
            if expected_sha256 is not None and actual != expected_sha256:
                raise SourceError(f"sha256 mismatch: expected {expected_sha256}, got {actual}", str(path),
                                  "the file is not the pinned one; check the recipe pin or the file")
            return actual, self.commit(tmp, actual)
        finally:
            tmp.unlink(missing_ok=True)

    # --- memos -----------------------------------------------------------------------------

    def step_index(self, key: str) -> Path:
        """The step-cache index of the step run keyed `key` (64 hex)."""
        return self.area("steps") / f"{key}.json"

    def compressed(self, method: str, level: object, raw_sha256: str) -> Path:
        """The memo of the bytes of digest `raw_sha256` compressed with `method` at `level`."""
        return self.area("compressed") / f"{method}-{level}-{raw_sha256}"

    def staged_dir(self, deb_sha256: str) -> Path:
        """Where the .deb of digest `deb_sha256` is unpacked."""
        return self.area("staged") / deb_sha256

    def apt_dir(self, sources_digest: str) -> Path:
        """The apt state of the session whose sources digest to `sources_digest` (16 hex)."""
        return self.area("apt") / sources_digest[:16]

    def resolved_memo(self, apt_dir: Path, key: str) -> Path:
        """The resolution memo `key` (packages + lists digest) of the apt session at `apt_dir`."""
        return apt_dir / "resolved" / f"{key[:32]}.json"

    def stub_memo(self, key: str) -> Path:
        """The compiled stub library whose inputs digest to `key` (64 hex)."""
        return self.area("stubs") / f"{key}.so"

    def rootfs_dir(self, key: str) -> Path:
        """The Debian root image built for `key` (spec + pins)."""
        return self.area("rootfs") / key[:32]
