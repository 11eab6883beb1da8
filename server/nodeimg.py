"""Per-node EEPROM images, rendered with the EEPROM module and cached.

The bootconf carries the standard keys of the node's boot mode plus the WALT_VPN_* values
(walt-vpn-reference.md step 4); the image is signed (`bootconf.sig`) and carries
`pubkey.bin` of the boot-signing key. Rendering is deterministic: the timestamp is the
node's `eeprom_ts` (set at enrollment and at each mode change), so the expected digest
only changes when something the node must see changes.

Rendered images are cached per (node, mode, certificate serial, render key) in
`<state>/eeprom/<mac12>/`, gzip-compressed (the 2 MiB images are mostly padding).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fwbuild.eeprom.assemble import assemble_eeprom, pieeprom_sig
from fwbuild.eeprom.bootconf import render_bootconf
from fwbuild.eeprom.synthetic import synthetic_image
from fwbuild.fsutil import atomic_write

from .artifacts import ArtifactMissing, eeprom_image
from .certs import VPN_USER
from .config import ServerConfig


@dataclass(frozen=True)
class NodeValues:
    """What a node's bootconf depends on."""

    mac12: str
    vpn_mac: str
    mode: str
    serial: int
    eeprom_ts: int
    creds: str


@dataclass(frozen=True)
class RenderedImage:
    image: bytes
    sha256: str
    key: str
    eeprom_ts: int

    @property
    def sig(self) -> bytes:
        return pieeprom_sig(self.image, self.eeprom_ts)


def http_path(mac12: str) -> str:
    return f"walt-vpn/node/{mac12}"


def node_root(config: ServerConfig, mac12: str, vpn_mac: str) -> str:
    return config.node_root.replace("{mac12}", mac12)


def bootconf_values(config: ServerConfig, node: NodeValues) -> dict[str, object]:
    extra: list[tuple[str, str]] = [
        ("WALT_VPN_MAC", node.vpn_mac),
        ("WALT_VPN_ENTRYPOINT", config.ssh_entrypoint.render(22)),
        ("WALT_VPN_BOOT_MODE", node.mode),
        ("WALT_VPN_USER", VPN_USER),
        ("WALT_VPN_ROOT", node_root(config, node.mac12, node.vpn_mac)),
    ]
    if config.proxy_jump:
        extra.append(("WALT_VPN_PROXY_JUMP", config.proxy_jump))
    if config.http_proxy:
        extra.append(("WALT_VPN_HTTP_PROXY", config.http_proxy))
    extra.append(("WALT_VPN_CREDS", node.creds))
    http = config.http_entrypoint
    return {
        "http_host": http.host,
        "http_port": None if http.port == 80 else http.port,
        "http_path": http_path(node.mac12),
        "extra": extra,
    }


class NodeImageRenderer:
    """Renders and caches node images; thread-safe."""

    def __init__(self, config: ServerConfig, boot_key: rsa.RSAPrivateKey,
                 base_image: Callable[[str], bytes | None], memory_entries: int = 32,
                 allow_synthetic: bool = False) -> None:
        self._config = config
        self._key = boot_key
        self._base_image = base_image
        self._allow_synthetic = allow_synthetic  # only for a set built from a virtual recipe
        self._dir = config.state_dir / "eeprom"
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, RenderedImage] = OrderedDict()
        self._memory_entries = memory_entries
        self._pub = boot_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    def _base(self, mode: str) -> bytes:
        base = self._base_image(mode)
        if base is not None:
            return base
        if self._allow_synthetic:
            return synthetic_image()  # virtual Pi 5 nodes: the synthetic image is their firmware
        raise ArtifactMissing(f"no EEPROM base image for boot mode {mode!r}",
                              str(self._config.artifacts / eeprom_image(mode)),
                              "build the recipe with this variant (`fwbuild build RECIPE`) "
                              "or fix server.artifacts")

    def render_key(self, base: bytes, text: str, ts: int) -> str:
        digest = hashlib.sha256()
        for part in (hashlib.sha256(base).digest(), self._pub, text.encode(), str(ts).encode()):
            digest.update(len(part).to_bytes(8, "big") + part)
        return digest.hexdigest()[:32]

    def _cache_path(self, node: NodeValues, key: str) -> Path:
        return self._dir / node.mac12 / f"{node.mode}-{node.serial}-{key}.bin.gz"

    def render(self, node: NodeValues) -> RenderedImage:
        base = self._base(node.mode)
        text = render_bootconf(node.mode, bootconf_values(self._config, node))
        key = self.render_key(base, text, node.eeprom_ts)
        with self._lock:
            hit = self._memory.get(key)
            if hit is not None:
                self._memory.move_to_end(key)
                return hit
        path = self._cache_path(node, key)
        image = self._load(path)
        if image is None:
            image = assemble_eeprom(base, text, boot_key=self._key, timestamp=node.eeprom_ts)
            self._store(node.mac12, path, image)
        rendered = RenderedImage(image, hashlib.sha256(image).hexdigest(), key, node.eeprom_ts)
        with self._lock:
            self._memory[key] = rendered
            while len(self._memory) > self._memory_entries:
                self._memory.popitem(last=False)
        return rendered

    def _load(self, path: Path) -> bytes | None:
        try:
            return gzip.decompress(path.read_bytes())
        except (OSError, EOFError, gzip.BadGzipFile):
            return None

    def remove_stale_temp_files(self) -> int:
        """Temp files a killed server left in the cache (atomic_write's `.NAME.*.tmp`)."""
        removed = 0
        if not self._dir.is_dir():
            return 0
        for directory in [self._dir, *(p for p in self._dir.iterdir() if p.is_dir())]:
            for path in directory.iterdir():
                if path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file():
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def _store(self, mac12: str, path: Path, image: bytes) -> None:
        # Node images embed the node's private key: 0600, like the database.
        atomic_write(path, gzip.compress(image, compresslevel=6, mtime=0), 0o600)
        for old in path.parent.iterdir():
            if old.name != path.name and old.name.endswith(".bin.gz"):
                try:
                    os.unlink(old)
                except FileNotFoundError:
                    pass

    def cached_macs(self) -> set[str]:
        """The nodes with a rendered image on disk."""
        if not self._dir.is_dir():
            return set()
        return {p.name for p in self._dir.iterdir() if p.is_dir()}

    def forget(self, mac12: str) -> None:
        directory = self._dir / mac12
        if directory.is_dir():
            for old in directory.iterdir():
                old.unlink(missing_ok=True)
            directory.rmdir()
